"""The CUDA path's torch._grouped_mm calls, checked without a GPU on ``meta`` tensors.

torch's meta kernel for ``_grouped_mm`` enforces what the CUDA kernel needs
(bf16 operands, int32 offsets, row- or column-major operands with 16-byte
aligned leading strides), so running the grouped path on meta tensors checks
every call's arguments. The fused path is forced on here: on this machine
``grouped_mm.available`` is False (no CUDA device).
"""
import pytest
import torch

from fairseq_hash import grouped_mm
from fairseq_hash.experts import ExpertFFN, GroupedLinear, grouped_linear
from fairseq_hash.grouped_mm import ExpertRows
from fairseq_hash.multihash import SegmentedExpertFFN


@pytest.fixture
def fused(monkeypatch):
    """The grouped path taken wherever the shapes allow (as on a 9.x GPU in bf16)."""
    calls = []
    real = torch._grouped_mm

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_mm, "available",
                        lambda device_type, index, dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(torch, "_grouped_mm", recording)
    return calls


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("counts", [[5, 0, 27, 32], [64, 0, 0, 0]])
def test_grouped_linear_forward_and_backward_pass_the_meta_kernels_checks(fused, counts):
    x, w, b = meta(64, 32), meta(4, 48, 32), meta(4, 48)
    y = grouped_linear(x, w, b, counts)
    assert y.shape == (64, 48) and y.dtype == torch.bfloat16
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    # forward, grad x, grad w, grad bias: every call had int32 offsets of K entries
    assert len(fused) == 4
    for args, kwargs in fused:
        assert kwargs["offs"].dtype == torch.int32 and kwargs["offs"].shape == (4,)


def test_an_expert_ffn_takes_the_grouped_path_in_bf16_and_the_offsets_are_made_once(fused):
    ffn = ExpertFFN(4, 32, 64).to(device="meta", dtype=torch.bfloat16)
    rows = ExpertRows([10, 0, 30, 24])
    x = meta(64, 32)
    ffn(x, rows).backward(torch.empty(64, 32, device="meta", dtype=torch.bfloat16))
    assert len(fused) == 8  # fc1 and fc2: forward and three gradients each
    assert len({id(kwargs["offs"]) for _, kwargs in fused}) == 1  # shared by both linears


def test_the_kernel_refuses_what_the_fallback_avoids():
    x, w = meta(64, 31), meta(4, 48, 31)
    offs = torch.empty(4, device="meta", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="16 bytes"):
        torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    with pytest.raises(RuntimeError, match="int32"):
        torch._grouped_mm(meta(64, 32), meta(4, 48, 32).transpose(-2, -1), offs=offs.long())
    with pytest.raises(RuntimeError, match="BF16"):
        torch._grouped_mm(meta(64, 32, dtype=torch.float32),
                          meta(4, 48, 32, dtype=torch.float32).transpose(-2, -1), offs=offs)


@pytest.mark.parametrize("shape, dtype, grouped", [
    ((4, 48, 32), torch.bfloat16, True),
    ((4, 48, 32), torch.float16, False),     # fused for bf16 only
    ((4, 48, 31), torch.bfloat16, False),    # rows not 16-byte aligned
    ((1023, 8, 32), torch.bfloat16, True),   # torch fuses fewer than 1024 groups
    ((1024, 8, 32), torch.bfloat16, False),  # MultiHash K*N = 1024: the loop
    ((4, 2, 48, 32), torch.bfloat16, False),  # MultiHash fc2 segments [K, N, d, f/N]
])
def test_the_grouped_path_is_taken_only_where_torch_fuses_it(fused, shape, dtype, grouped):
    x = torch.empty(8, shape[-1], device="meta", dtype=dtype)
    weight = torch.empty(*shape, device="meta", dtype=dtype)
    assert grouped_mm.usable(x, weight) is grouped


def test_the_probe_refuses_gpus_where_torch_does_not_fuse(monkeypatch):
    grouped_mm.available.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert not grouped_mm.available("cuda", 0, torch.bfloat16)
        assert not grouped_mm.available("cpu", None, torch.bfloat16)
    finally:
        grouped_mm.available.cache_clear()


def test_multihash_with_1024_narrow_experts_takes_the_loop_and_computes(fused):
    ffn = SegmentedExpertFFN(256, 16, 64, num_hashes=4).to(torch.bfloat16)
    counts = [0] * 1024
    counts[3], counts[1000] = 5, 3
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    ffn(x, counts).sum().backward()
    assert not fused and torch.isfinite(x.grad.float()).all()


def test_grouped_linear_function_is_the_loop_on_cpu():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: GroupedLinear.apply(x, w, b, ExpertRows([2, 0, 4])), (x, w, b))


def test_the_grouped_bias_gradient_sums_in_float32(monkeypatch):
    """4096 rows of gradient 1 in bf16: a sum rounded to bf16 after every row stops
    at 256 (256 + 1 rounds to 256), as CUDA's bf16 ``index_add_`` did; the
    grouped product's float32 sum is 4096. (CPU's ``index_add_`` sums exactly,
    so the old path cannot be shown failing here.)"""
    monkeypatch.setattr(grouped_mm, "usable", lambda x, weight: True)
    x = torch.zeros(4096, 16, dtype=torch.bfloat16)
    w = torch.zeros(2, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(2, 16, dtype=torch.bfloat16, requires_grad=True)
    grouped_linear(x, w, b, [4096, 0]).sum().backward()
    assert b.grad[0].eq(4096).all() and b.grad[1].eq(0).all()
