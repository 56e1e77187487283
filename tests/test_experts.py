"""The optimised dispatch and grouped experts compute exactly what a plain
per-token loop computes, in every dtype the model may train in."""
import pytest
import torch
import torch.nn.functional as F

from fairseq_hash.experts import ExpertFFN, grouped_linear
from fairseq_hash.moe_layer import MoELayer
from fairseq_hash.routers import RouterOutput


class FixedRouter(torch.nn.Module):
    """Routes by a given [S, k] table of experts (and weights, and drops)."""

    def __init__(self, indices, weights=None, dropped=None):
        super().__init__()
        self.indices, self.weights, self.dropped = indices, weights, dropped

    def forward(self, x, route):
        return RouterOutput(indices=self.indices, weights=self.weights, dropped=self.dropped)


def reference_moe(x, experts, indices, weights=None, dropped=None):
    """sum over slots j of weight[t, j] * FFN_{indices[t, j]}(x_t), one token at a time."""
    rows = []
    for t in range(x.size(0)):
        y = x.new_zeros(x.size(1))
        for j in range(indices.size(1)):
            if dropped is not None and dropped[t, j]:
                continue
            e = int(indices[t, j])
            h = F.relu(F.linear(x[t], experts.fc1_weight[e], experts.fc1_bias[e]))
            out = F.linear(h, experts.fc2_weight[e], experts.fc2_bias[e])
            y = y + (out if weights is None else weights[t, j] * out)
        rows.append(y)
    return torch.stack(rows)


def grads_of(fn, *tensors):
    for t in tensors:
        t.grad = None
    y = fn()
    # drawn in float32 and then rounded: the same upstream gradient for every dtype
    # (torch 2.11 draws bf16 randn_like from another stream than float32's)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype))
    return y.detach(), [t.grad.clone() for t in tensors]


def assert_near(a, b, rel):
    """Relative error of the whole tensor: low precision flips a few ReLUs."""
    err = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
    assert err < rel, f"relative error {err:.4f} over {rel}"


def make(S=24, d=8, f=12, K=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    experts = ExpertFFN(K, d, f, seed=seed).to(dtype)
    x = torch.randn(S, d, dtype=dtype, requires_grad=True)
    return experts, x


def test_grouped_linear_equals_per_expert_linear_and_idle_expert_gets_zero_grad():
    torch.manual_seed(0)
    counts = [5, 0, 7, 4]
    x = torch.randn(16, 6, requires_grad=True)
    w = torch.randn(4, 10, 6, requires_grad=True)
    b = torch.randn(4, 10, requires_grad=True)
    y, (gx, gw, gb) = grads_of(lambda: grouped_linear(x, w, b, counts), x, w, b)
    bounds = [0, 5, 5, 12, 16]

    def ref():
        return torch.cat([F.linear(x[bounds[e]:bounds[e + 1]], w[e], b[e]) for e in range(4)])

    y_ref, (gx_ref, gw_ref, gb_ref) = grads_of(ref, x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(gw[1]) == 0 and torch.count_nonzero(gb[1]) == 0


def test_counts_that_do_not_cover_every_row_are_refused():
    # the dispatch hands the experts exactly the rows it counted
    x, w, b = torch.randn(10, 4), torch.randn(2, 3, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="10 rows"):
        grouped_linear(x, w, b, [3, 4])


def test_one_expert_per_token_matches_the_per_token_loop():
    experts, x = make()
    indices = torch.tensor([[2], [0], [3], [2], [2], [0]] * 4)  # expert 1 idle
    moe = MoELayer(FixedRouter(indices), experts)
    params = list(experts.parameters())
    y, grads = grads_of(lambda: moe(x), x, *params)
    y_ref, grads_ref = grads_of(lambda: reference_moe(x, experts, indices), x, *params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(experts.fc1_weight.grad[1]) == 0
    assert torch.count_nonzero(experts.fc2_bias.grad[1]) == 0
    assert moe.num_dropped == 0


def test_weighted_top2_with_dropped_slots_matches_the_per_token_loop():
    experts, x = make(seed=1)
    S = x.size(0)
    gen = torch.Generator().manual_seed(5)
    indices = torch.randint(4, (S, 2), generator=gen)
    weights = torch.rand(S, 2, generator=gen).requires_grad_()
    dropped = torch.rand(S, 2, generator=gen) < 0.2
    moe = MoELayer(FixedRouter(indices, weights, dropped), experts)
    params = [x, weights, *experts.parameters()]
    y, grads = grads_of(lambda: moe(x), *params)
    y_ref, grads_ref = grads_of(
        lambda: reference_moe(x, experts, indices, weights, dropped), *params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert moe.num_dropped == int(dropped.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_in_low_precision_keeps_its_dtype_and_tracks_float32(dtype):
    experts32, x32 = make(S=64, d=16, f=32)
    indices = torch.randint(4, (64, 1), generator=torch.Generator().manual_seed(2))
    experts = ExpertFFN(4, 16, 32).to(dtype)
    experts.load_state_dict({k: v.to(dtype) for k, v in experts32.state_dict().items()})
    x = x32.detach().to(dtype).requires_grad_()
    # the float32 reference starts from the same rounded weights and inputs, so
    # what differs is the arithmetic alone
    experts32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    y, grads = grads_of(lambda: MoELayer(FixedRouter(indices), experts)(x), x,
                        *experts.parameters())
    y32, grads32 = grads_of(lambda: MoELayer(FixedRouter(indices), experts32)(x32), x32,
                            *experts32.parameters())
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_near(y, y32, 0.02)
    for g, g32 in zip(grads, grads32):
        assert_near(g, g32, 0.06)


def test_autocast_computes_in_bfloat16_and_gives_float32_weights_their_gradient():
    experts, x = make(S=64, d=16, f=32)
    indices = torch.randint(4, (64, 1), generator=torch.Generator().manual_seed(2))
    moe = MoELayer(FixedRouter(indices), experts)
    y32, grads32 = grads_of(lambda: moe(x), x, *experts.parameters())

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return moe(x)

    y, grads = grads_of(under_autocast, x, *experts.parameters())
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    assert_near(y, y32, 0.02)
    for g, g32 in zip(grads, grads32):
        assert_near(g, g32, 0.06)


def test_hash_model_in_bfloat16_trains_a_step_as_fairseq_converts_it(tmp_path):
    """fairseq's trainer converts the whole model with ``model.to(bfloat16)``
    (``--bf16``); fairseq itself only runs --bf16 on TPU and --fp16 on CUDA,
    so on CPU the conversion and a training step are checked here directly."""
    from argparse import Namespace

    from fairseq.data import Dictionary
    from fairseq_hash.models.hash_transformer_lm import HashTransformerLanguageModel

    d = Dictionary()
    for i in range(40):
        d.add_symbol(f"w{i}", n=100 - i)
    task = Namespace(source_dictionary=d, target_dictionary=d)
    from fairseq.models.transformer_lm import base_lm_architecture

    args = Namespace(decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32,
                     decoder_attention_heads=2, hash_layer="-1", hash_experts=4,
                     hash_type="balanced", hash_seed=1, tokens_per_sample=32,
                     max_target_positions=None, character_embeddings=False,
                     adaptive_input=False, dropout=0.0)
    base_lm_architecture(args)
    model = HashTransformerLanguageModel.build_model(args, task).to(torch.bfloat16)
    experts = model.decoder.moe_layers[1].experts
    assert experts.fc1_weight.dtype == torch.bfloat16
    tokens = torch.randint(4, 44, (3, 10), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    assert logits.dtype == torch.bfloat16
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tokens.view(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert experts.fc1_weight.grad.dtype == torch.bfloat16
    assert torch.count_nonzero(experts.fc1_weight.grad) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_the_portable_loop(monkeypatch, dtype):
    """torch's grouped product serves CUDA; its CPU fallback runs the same calls here."""
    from fairseq_hash import grouped_mm

    torch.manual_seed(0)
    counts = [16, 0, 8, 24]
    x = torch.randn(48, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 32, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    loop = grads_of(lambda: grouped_linear(x, w, b, counts), x, w, b)
    monkeypatch.setattr(grouped_mm, "usable", lambda x, weight: True)
    grouped = grads_of(lambda: grouped_linear(x, w, b, counts), x, w, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grouped[0], loop[0], **tol)
    for g, g_loop in zip(grouped[1], loop[1]):
        torch.testing.assert_close(g, g_loop, **tol)
    assert torch.count_nonzero(grouped[1][1][1]) == 0


@pytest.mark.parametrize("activation", [F.relu, F.gelu])
def test_fused_expert_ffn_equals_the_two_grouped_products(activation):
    """The fused per-expert FFN (CPU fast path) against the generic one,
    reached through an activation the fused path does not recognise."""
    torch.manual_seed(0)
    counts = [9, 0, 3, 12]
    experts = ExpertFFN(4, 8, 16, activation_fn=activation)
    x = torch.randn(24, 8, requires_grad=True)
    params = [x, *experts.parameters()]
    fused = grads_of(lambda: experts(x, counts), *params)
    experts.activation_fn = lambda t: activation(t)
    generic = grads_of(lambda: experts(x, counts), *params)
    torch.testing.assert_close(fused[0], generic[0], rtol=1e-5, atol=1e-6)
    for g, g_generic in zip(fused[1], generic[1]):
        torch.testing.assert_close(g, g_generic, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(experts.fc1_weight.grad[1]) == 0


def test_active_activation_dropout_is_applied():
    torch.manual_seed(0)
    experts = ExpertFFN(2, 8, 64, activation_dropout=torch.nn.Dropout(0.5))
    x = torch.randn(10, 8)
    experts.train()
    assert not torch.allclose(experts(x, [4, 6]), experts(x, [4, 6]))
    experts.eval()
    torch.testing.assert_close(experts(x, [4, 6]), experts(x, [4, 6]))


@pytest.mark.parametrize("threads", ["1", "3"])
def test_experts_computed_in_parallel_groups_equal_one_at_a_time(monkeypatch, threads):
    torch.manual_seed(0)
    counts = [7, 0, 5, 1, 9, 2]
    experts = ExpertFFN(6, 8, 16)
    x = torch.randn(24, 8, requires_grad=True)
    params = [x, *experts.parameters()]
    monkeypatch.setenv("FAIRSEQ_HASH_EXPERT_THREADS", "1")
    serial = grads_of(lambda: experts(x, counts), *params)
    monkeypatch.setenv("FAIRSEQ_HASH_EXPERT_THREADS", threads)
    for fused in (True, False):
        if not fused:
            experts.activation_fn = lambda t: F.relu(t)  # the two-product path
        parallel = grads_of(lambda: experts(x, counts), *params)
        torch.testing.assert_close(parallel[0], serial[0], rtol=0, atol=0)
        for g, g_serial in zip(parallel[1], serial[1]):
            torch.testing.assert_close(g, g_serial, rtol=1e-6, atol=1e-6)


def test_every_slot_dropped_gives_zero_output_and_gradient():
    experts, x = make(S=6)
    indices = torch.zeros(6, 1, dtype=torch.long)
    moe = MoELayer(FixedRouter(indices, dropped=torch.ones(6, 1, dtype=torch.bool)), experts)
    y, (gx, gw) = grads_of(lambda: moe(x), x, experts.fc1_weight)
    assert torch.count_nonzero(y) == 0 and torch.count_nonzero(gx) == 0
    assert torch.count_nonzero(gw) == 0 and moe.num_dropped == 6
