"""Top-k hash routing (--hash-topk), learned scores (--hash-score), shared experts."""

import pytest
import torch
import torch.nn.functional as F
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from hashfns_util import hashfns_data_dir, hashfns_dictionary, hashfns_model, hashfns_tokens
from fairseq_hash.embedding_tables import disperse
from fairseq_hash.errors import HashConfigError
from fairseq_hash.hashing import (HASH_REGISTRY, RouteInputs, build_hash_function, expected_load,
                                  token_counts)
from fairseq_hash.models.fairseq_surgery import replace_ffn
from fairseq_hash.moe_factory import build_hash_moe
from fairseq_hash.moe_layer import MoELayer
from fairseq_hash.route import Route
from fairseq_hash.scores import HashScoreGate
from fairseq_hash.spec import HashLayerSpec
from fairseq_hash.table_file import load_table_file

BUILT_TYPES = sorted(set(HASH_REGISTRY) - {"clustered", "dispersed"})
SCORES = ["softmax", "sigmoid", "sqrt-softplus"]


def layer_spec(**kw):
    return HashLayerSpec(**{"total_experts": 4, "hash_type": "random", "topk": 2, **kw})


def route(d, tokens):
    return RouteInputs.from_tokens(tokens, d.pad(), d.eos())


@pytest.mark.parametrize("name", BUILT_TYPES)
@pytest.mark.parametrize("k", [2, 3])
def test_every_table_type_routes_a_token_to_k_distinct_experts(name, k):
    d = hashfns_dictionary(200)
    fn = build_hash_function(name, 8)
    table = fn.build_topk_table(d, 8, k, seed=1)
    tokens = torch.randint(d.nspecial, len(d), (4, 30))
    experts = fn.route(table, route(d, tokens))  # [B, T, k]
    assert experts.shape == (4, 30, k)
    assert (experts.sort(-1).values.diff(dim=-1) != 0).all(), name
    assert experts.min() >= 0 and experts.max() < 8
    assert experts.unique().numel() == 8  # all experts serve someone


def test_balanced_top_k_keeps_every_expert_within_one_token_of_its_share():
    d = hashfns_dictionary(300)
    counts = token_counts(d)
    for k in (2, 3, 5):
        table = build_hash_function("balanced").build_topk_table(d, 8, k, seed=1)
        load = expected_load(table, counts, 8).sum(0) * counts.sum()  # tokens per expert, all slots
        ideal = k * counts.sum() / 8
        assert load.max() <= ideal + counts.max() + 1e-6, k
        assert load.min() >= ideal - counts.max() - 1e-6, k


def test_balanced_top_1_is_the_plain_balanced_table():
    d = hashfns_dictionary(200)
    fn = build_hash_function("balanced")
    torch.testing.assert_close(fn.build_topk_table(d, 8, 1, 1), fn.build_table(d, 8, 1, 1),
                               rtol=0, atol=0)


def test_top_1_with_score_none_is_the_plain_hash_layer_bit_for_bit(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    plain, d = hashfns_model(data)
    same, _ = hashfns_model(data, "--hash-topk", 1, "--hash-score", "none",
                            "--hash-shared-experts", 0)
    a, b = plain.state_dict(), same.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        torch.testing.assert_close(same(tokens)[0], plain(tokens)[0], rtol=0, atol=0)
    moe = same.decoder.moe_layers[1]
    assert type(moe) is MoELayer and moe.router.gate is None
    assert moe.router(torch.zeros(1, 16), route(d, tokens[:1, :1])).weights is None


def test_score_none_averages_the_k_experts():
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(), d, 0, 8, 16)
    tokens = torch.randint(d.nspecial, len(d), (2, 5))
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        y = moe(x, route(d, tokens)).reshape(-1, 8)
        chosen = moe.last_indices  # [S, 2]
        want = torch.stack([sum(expert_ffn(moe.experts, int(e), xs) for e in es) / 2
                            for xs, es in zip(x.reshape(-1, 8), chosen)])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_normalised_scores_sum_to_the_scale_over_a_tokens_k_experts(score, scale):
    gate = HashScoreGate(8, 6, score, scale)
    with torch.no_grad():
        gate.weight.normal_()
    indices = torch.stack([torch.randperm(6)[:3] for _ in range(20)])  # [S, 3]
    weights = gate(torch.randn(20, 8), indices)
    assert weights.shape == (20, 3) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.full((20,), scale))
    assert weights.std(-1).min() > 0  # the tokens' experts are really weighed apart


@pytest.mark.parametrize("score", SCORES)
def test_the_gate_sees_only_the_hashed_experts(score):
    gate = HashScoreGate(8, 6, score)
    indices = torch.tensor([[0, 2], [2, 4], [4, 0]])
    with torch.no_grad():
        gate.weight.normal_()
        gate.weight[[1, 3, 5]] = float("nan")  # rows of experts no token is hashed to
    x = torch.randn(3, 8, requires_grad=True)
    weights = gate(x, indices)
    assert torch.isfinite(weights).all()
    (weights * torch.randn(3, 2)).sum().backward()  # (their plain sum is constant)
    assert torch.isfinite(x.grad).all()
    assert gate.weight.grad[[1, 3, 5]].eq(0).all() and gate.weight.grad[[0, 2, 4]].ne(0).any()


@pytest.mark.parametrize("flags, message", [
    (dict(topk=5), "--hash-topk 5: must lie in"),
    (dict(num_hashes=2), "--hash-topk 2 with --hash-count 2"),
    (dict(score="cosine"), "--hash-score 'cosine' is unknown"),
    (dict(score="sigmoid", score_scale=0.0), "--hash-score-scale 0.0"),
    (dict(topk=1, score="softmax"), "--hash-score softmax over --hash-topk 1 expert"),
    (dict(router="switch"), "--hash-topk and --hash-score need --router hash"),
])
def test_bad_top_k_flags_are_one_line_errors(flags, message):
    with pytest.raises(HashConfigError, match=message):
        layer_spec(**flags).validate()


def expert_ffn(experts, e, x):
    h = torch.relu(experts.fc1_weight[e] @ x + experts.fc1_bias[e])
    return experts.fc2_weight[e] @ h + experts.fc2_bias[e]


def reference_scored(x, moe, indices, score, scale):
    """The definition, token by token: gate logits at the k experts, scores, weighted sum."""
    out = []
    for s in range(x.size(0)):
        es = indices[s].tolist()
        logits = torch.stack([moe.router.gate.weight[e] @ x[s] for e in es])
        if score == "softmax":
            w = torch.softmax(logits, 0)
        else:
            w = torch.sigmoid(logits) if score == "sigmoid" else F.softplus(logits).sqrt()
            w = w / w.sum()
        out.append(sum(scale * w[j] * expert_ffn(moe.experts, e, x[s]) for j, e in enumerate(es)))
    return torch.stack(out)


@pytest.mark.parametrize("score", SCORES)
def test_gradients_reach_the_gate_and_match_a_per_token_loop(score):
    torch.manual_seed(0)
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(score=score, score_scale=1.5), d, 0, 8, 16)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    tokens = torch.randint(d.nspecial, len(d), (2, 6))
    x = torch.randn(6, 2, 8, requires_grad=True)
    g = torch.randn(6, 2, 8)
    (moe(x, route(d, tokens)) * g).sum().backward()
    params = [x, moe.router.gate.weight, *moe.experts.parameters()]
    got = [p.grad.clone() for p in params]
    assert got[1].abs().sum() > 0
    for p in params:
        p.grad = None
    want = reference_scored(x.reshape(-1, 8), moe, moe.last_indices, score, 1.5)
    (want * g.reshape(-1, 8)).sum().backward()
    for mine, p in zip(got, params):
        torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=1e-5)


def test_gate_weights_are_shared_parameters():
    moe = build_hash_moe(layer_spec(score="sigmoid", shared_experts=1), hashfns_dictionary(),
                         0, 8, 16)
    assert not getattr(moe.router.gate.weight, "expert", False)
    assert not any(getattr(p, "expert", False) for p in moe.shared.parameters())
    assert all(getattr(p, "expert", False) for p in moe.experts.parameters())


def test_shared_experts_alone_equal_a_dense_ffn_with_the_same_weights():
    d = hashfns_dictionary()
    cfg = TransformerConfig()
    cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim, cfg.decoder.attention_heads = 16, 32, 2
    cfg.dropout = 0.0
    torch.manual_seed(0)
    dense = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
    torch.manual_seed(0)
    hashed = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
    moe = build_hash_moe(layer_spec(score="softmax", shared_experts=1), d, 0, 16, 32)
    with torch.no_grad():
        moe.shared.fc1.load_state_dict(hashed.fc1.state_dict())
        moe.shared.fc2.load_state_dict(hashed.fc2.state_dict())
        moe.experts.fc2_weight.zero_()  # the routed experts' outputs are zero
        moe.experts.fc2_bias.zero_()
    replace_ffn(hashed, moe)
    tokens = torch.randint(d.nspecial, len(d), (3, 7))
    moe.route = Route(route(d, tokens))
    x = torch.randn(7, 3, 16)
    mask = torch.triu(torch.full((7, 7), float("-inf")), 1)
    want, _, _ = dense(x, self_attn_mask=mask)
    got, _, _ = hashed(x, self_attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_equal_active_parameters_with_halved_widths(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    plain, _ = hashfns_model(data)
    shared, _ = hashfns_model(data, "--hash-shared-experts", 1, "--hash-shared-ffn-dim", 16,
                              "--hash-expert-ffn-dim", 16)
    moe = shared.decoder.moe_layers[1]
    assert moe.experts.fc1_weight.shape == (4, 16, 16) and moe.shared.fc1.weight.shape == (16, 16)
    # one routed expert plus the shared one: as many weights a token as one dense FFN
    dense_ffn = 2 * 16 * 32 + 32 + 16
    active = (moe.experts.fc1_weight[0].numel() + moe.experts.fc1_bias[0].numel()
              + moe.experts.fc2_weight[0].numel() + moe.experts.fc2_bias[0].numel()
              + sum(p.numel() for p in moe.shared.parameters()))
    assert active == dense_ffn + 16  # the second fc2 bias


def test_incremental_decoding_routes_top_k_as_the_full_forward(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    model, d = hashfns_model(data, "--hash-type", "bigram", "--hash-layer", "0,1", "--hash-topk", 2,
                             "--hash-score", "sqrt-softplus", "--hash-shared-experts", 1)
    for moe in model.decoder.moe_layers.values():
        with torch.no_grad():
            moe.router.gate.weight.normal_()
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        full = model(tokens)[0]
        routed = model.decoder.moe_layers[1].last_indices.view(tokens.size(1), -1, 2)  # [T, B, k]
        state, steps = {}, []
        for t in range(tokens.size(1)):
            steps.append(model.decoder(tokens[:, : t + 1], incremental_state=state)[0])
            assert torch.equal(model.decoder.moe_layers[1].last_indices, routed[t])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_refuses_another_top_k(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    two, _ = hashfns_model(data, "--hash-topk", 2)
    three, _ = hashfns_model(data, "--hash-topk", 3)
    with pytest.raises(HashConfigError, match="the checkpoint has 2 expert\\(s\\) per token in "
                                              "decoder hash layer 1 but --hash-topk is 3"):
        three.load_state_dict(two.state_dict())


def save_tid2eid(path, table, key="tid2eid"):
    torch.save({key: table}, path)
    return str(path)


def test_a_tid2eid_tensor_is_read_from_a_pt_file(tmp_path):
    d = hashfns_dictionary()
    table = torch.stack([torch.randperm(4)[:2] for _ in range(len(d))]).int()
    # a key as in a checkpoint of another system: one name ending in .tid2eid
    path = save_tid2eid(tmp_path / "t.pt", table, key="model.layers.0.ffn.gate.tid2eid")
    got = load_table_file(path, d, "balanced", 4, 1, topk=2)
    assert got.dtype == torch.long and torch.equal(got, table.long())


@pytest.mark.parametrize("rows, columns, entries, message", [
    (-1, 2, None, "tid2eid has 43 rows but the dictionary has 44 symbols"),
    (0, 3, None, r"tid2eid is \[44, 3\], expected \[vocabulary, --hash-topk 2\]"),
    (0, 2, [[1, 1]], "row 0 names an expert twice"),
    (0, 2, [[0, 4]], r"entries must lie in \[0, 4\)"),
])
def test_a_bad_tid2eid_table_is_a_one_line_error(tmp_path, rows, columns, entries, message):
    d = hashfns_dictionary()
    table = torch.stack([torch.randperm(4)[:columns] for _ in range(len(d) + rows)])
    if entries:
        table[0] = torch.tensor(entries[0])
    path = save_tid2eid(tmp_path / "t.pt", table)
    with pytest.raises(HashConfigError, match=message) as err:
        load_table_file(path, d, "balanced", 4, 1, topk=2)
    assert "\n" not in str(err.value) and "t.pt" in str(err.value)


def test_tid2eid_needs_a_token_hash_type(tmp_path):
    d = hashfns_dictionary()
    path = save_tid2eid(tmp_path / "t.pt", torch.zeros(len(d), 2, dtype=torch.long))
    with pytest.raises(HashConfigError, match="--hash-type bigram needs another table"):
        load_table_file(path, d, "bigram", 4, 1, topk=2)


def test_a_safetensors_tid2eid_is_read_or_refused_in_one_line(tmp_path):
    d = hashfns_dictionary()
    table = torch.stack([torch.randperm(4)[:2] for _ in range(len(d))])
    path = str(tmp_path / "t.safetensors")
    try:
        from safetensors.torch import save_file
    except ImportError:
        open(path, "wb").close()
        with pytest.raises(HashConfigError, match="needs the safetensors package"):
            load_table_file(path, d, "random", 4, 1, topk=2)
        return
    save_file({"tid2eid": table}, path)
    assert torch.equal(load_table_file(path, d, "random", 4, 1, topk=2), table)


def embeddings_and_counts():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(60, 6, generator=gen), torch.arange(60, 0, -1).double()


def test_clustered_top_k_leads_with_the_tokens_own_cluster():
    embeddings, counts = embeddings_and_counts()
    fn = build_hash_function("clustered", 8)
    own = fn.table_from_embeddings(embeddings, counts, 8, 1, seed=3)[:, 0]
    top = fn.table_from_embeddings(embeddings, counts, 8, 1, seed=3, topk=3)
    assert top.shape == (60, 3) and (top.sort(-1).values.diff(dim=-1) != 0).all()
    assert torch.equal(top[:, 0], own)


def test_dispersed_top_k_gives_no_two_members_of_a_small_cluster_one_expert():
    _, counts = embeddings_and_counts()
    clusters = torch.arange(60) % 20  # 20 clusters of 3 members: 6 slots on 8 experts each
    top = disperse(clusters, counts, 8, slots=2)
    assert top.shape == (60, 2) and (top.sort(-1).values.diff(dim=-1) != 0).all()
    for c in range(20):
        members = top[clusters == c]  # [3, 2]
        assert members.unique().numel() == 6, c


def test_fairseq_hash_table_writes_a_top_k_file_that_training_reads(tmp_path):
    from fairseq.data import Dictionary

    from fairseq_hash.cli.hash_table import main

    data = hashfns_data_dir(str(tmp_path / "data"))
    path = str(tmp_path / "b2.json")
    main(["balanced", "--data", data, "--experts", "4", "--topk", "2", "--output", path])
    d = Dictionary.load(f"{data}/dict.txt")
    table = load_table_file(path, d, "balanced", 4, 1, topk=2)
    assert torch.equal(table, build_function_table(d))
    with pytest.raises(HashConfigError, match="gives 2 expert\\(s\\) per token but --hash-topk is 1"):
        load_table_file(path, d, "balanced", 4, 1)


def build_function_table(d):
    return build_hash_function("balanced").build_topk_table(d, 4, 2, seed=1)


def test_the_compare_models_hash_top2_and_hash_shared_build_as_named(tmp_path):
    from fairseq_hash.cli.experiments.compare import MODELS

    data = hashfns_data_dir(str(tmp_path))
    top2, _ = hashfns_model(data, *MODELS["hash-top2"])
    router = top2.decoder.moe_layers[1].router
    assert router.topk == 2 and router.gate.score == "softmax" and router.table.size(1) == 2
    shared, _ = hashfns_model(data, *[a.format(half_ffn=16) for a in MODELS["hash-shared"]])
    moe = shared.decoder.moe_layers[1]
    assert moe.experts.fc1_weight.shape[1] == 16 and moe.shared.fc1.out_features == 16
