"""The hash layer inside a fairseq Transformer layer: outputs and gradients."""
import torch
from fairseq.data import Dictionary
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from fairseq_hash.experts import ExpertFFN
from fairseq_hash.hashing import RouteInputs, build_hash_function
from fairseq_hash.models.fairseq_surgery import replace_ffn
from fairseq_hash.moe_factory import build_hash_moe
from fairseq_hash.moe_layer import MoELayer
from fairseq_hash.route import Route
from fairseq_hash.routers import HashRouter
from fairseq_hash.spec import HashLayerSpec


def small_dictionary(n=50):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"t{i}", n=100 - i)
    return d


def layer_spec(**kw):
    return HashLayerSpec(**{"total_experts": 4, "hash_type": "random", **kw})


def layer_pair(d, embed=16, ffn=32):
    cfg = TransformerConfig()
    cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim, cfg.decoder.attention_heads = embed, ffn, 2
    cfg.dropout = 0.0
    torch.manual_seed(0)
    dense = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
    torch.manual_seed(0)
    hashed = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
    fc1, fc2 = hashed.fc1, hashed.fc2
    moe = build_hash_moe(layer_spec(), d, 0, embed, ffn)
    replace_ffn(hashed, moe)
    return dense, hashed, moe, (fc1, fc2)


def test_identical_experts_give_the_dense_ffn_output():
    d = small_dictionary()
    dense, hashed, moe, (fc1, fc2) = layer_pair(d)
    moe.experts.load_dense(fc1, fc2)
    tokens = torch.randint(4, len(d), (3, 7))
    moe.route = Route(RouteInputs.from_tokens(tokens, d.pad(), d.eos()))
    x = torch.randn(7, 3, 16)  # [T, B, d], fairseq's layout
    mask = torch.triu(torch.full((7, 7), float("-inf")), 1)
    want, _, _ = dense(x, self_attn_mask=mask)
    got, _, _ = hashed(x, self_attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the K experts were really used
    assert moe.last_indices.unique().numel() > 1


def test_gradients_reach_only_experts_that_received_tokens():
    d = small_dictionary()
    table = torch.zeros(len(d), 1, dtype=torch.long)
    table[10], table[11] = 1, 3  # experts 0, 1, 3 get tokens, expert 2 none
    router = HashRouter(build_hash_function("random"), table, 4, 0)
    moe = MoELayer(router, ExpertFFN(4, 8, 16))
    tokens = torch.tensor([[10, 11, 12, 10]])
    x = torch.randn(4, 1, 8, requires_grad=True)
    moe(x, RouteInputs.from_tokens(tokens, d.pad(), d.eos())).sum().backward()
    for name, p in moe.experts.named_parameters():
        norms = p.grad.flatten(1).norm(dim=1)
        assert norms[2] == 0, name
        assert (norms[[0, 1, 3]] > 0).all(), name
    assert x.grad.abs().sum() > 0


def test_expert_parameters_are_marked():
    moe = MoELayer(HashRouter(build_hash_function("random"), torch.zeros(5, 1, dtype=torch.long), 2, 0),
                   ExpertFFN(2, 4, 8))
    assert all(getattr(p, "expert", False) for p in moe.experts.parameters())
    assert not any(getattr(p, "expert", False) for p in moe.router.parameters())


def test_a_model_hands_each_hash_layer_its_route_for_the_forward_only(tmp_path):
    from hashfns_util import hashfns_data_dir, hashfns_model, hashfns_tokens

    model, d = hashfns_model(hashfns_data_dir(str(tmp_path)), "--hash-layer", "0,1")
    tokens = hashfns_tokens(d)
    seen = {}
    for idx, moe in model.decoder.moe_layers.items():
        moe.register_forward_pre_hook(lambda m, args, idx=idx: seen.update({idx: m.route}))
    model(tokens)
    for idx, moe in model.decoder.moe_layers.items():
        # the hash layers' dispatch, planned before any layer ran: counts on the host
        assert isinstance(seen[idx], Route) and seen[idx].plan.counts is not None
        assert sum(seen[idx].plan.counts) == tokens.numel()  # no padding here
        assert torch.equal(seen[idx].inputs.tokens, tokens)
        assert moe.route is None  # nothing left behind for the next call


def test_expert_counts_equal_bincount_without_sizing_by_the_largest_index():
    from fairseq_hash.route import expert_counts

    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 5, (40, 2), generator=gen)  # 5 of 7 buckets used
    assert torch.equal(expert_counts(indices, 7), torch.bincount(indices.reshape(-1), minlength=7))
    assert expert_counts(indices, 7).shape == (7,)
