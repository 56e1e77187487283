"""GPU: torch's grouped matrix product, one kernel for all experts of a linear map.

    rows = ExpertRows(counts)                                  # K ints summing to S
    if grouped_mm.usable(x, weight):                           # weight: [K, out, in]
        y = grouped_mm.linear(x, weight, bias, rows)           # x: [S, in] -> y: [S, out]
        grad_x, grad_w, grad_b = grouped_mm.linear_backward(grad_y, x, weight, rows, needs)

The one place that calls ``torch._grouped_mm``, private to torch: it takes
``offs``, the cumulative end row of each expert's slice as int32, and no bias.
It is used only where torch fuses it into one kernel: CUDA, bf16, compute
capability 9.x or 10.x, fewer than 1024 groups (so MultiHash with K*N >= 1024
narrow experts takes the loop); elsewhere torch runs it as a loop of products
that copies the offsets to the host on every call, and the experts' own loop
over their row slices (``experts.py``) is used instead. torch's meta kernel
checks the same argument rules (bf16, int32 offsets, strides, 16-byte
alignment), so ``tests/test_grouped_mm.py`` runs these calls on ``meta``
tensors without a GPU.

:class:`ExpertRows` carries the rows of each expert as Python ints (known on
the host, from a hash layer's plan) and makes the device tensors the kernel
needs once, shared by fc1, fc2, their backward and a recomputation, without
waiting for the device.
"""
from functools import lru_cache
from typing import List, Optional

import torch

# torch fuses its grouped product for fewer groups only; above, it loops
MAX_GROUPS = 1023


def to_device(values: List[int], device) -> torch.Tensor:
    """Host ints as a long tensor on ``device``, without waiting for the device
    (through pinned memory on CUDA; a copy from pageable memory blocks)."""
    host = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class ExpertRows:
    """Rows of each expert in a batch sorted by expert: ``counts`` as Python ints,
    and the device tensors the grouped product needs, made once.

    ``device_counts`` (the same counts on the device) spares a copy from the
    host where the caller has them.
    """

    def __init__(self, counts: List[int], device_counts: Optional[torch.Tensor] = None):
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self._device_counts = device_counts
        self._made = {}

    @classmethod
    def of(cls, counts) -> "ExpertRows":
        return counts if isinstance(counts, ExpertRows) else cls(counts)

    def _memo(self, name, device, make):
        key = (name, device)
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def device_counts(self, device) -> torch.Tensor:
        return self._memo("counts", device, lambda: (
            self._device_counts.to(device) if self._device_counts is not None
            else to_device(self.counts, device)))

    def offsets(self, device) -> torch.Tensor:
        """``[K]`` int32 end row of each expert (``offs``)."""
        return self._memo("offsets", device,
                          lambda: self.device_counts(device).cumsum(0).to(torch.int32))

    def expert_of_row(self, device) -> torch.Tensor:
        """``[S]`` the expert of each row."""
        return self._memo("rows", device, lambda: torch.repeat_interleave(
            torch.arange(len(self.counts), device=device), self.device_counts(device),
            output_size=self.total))

    def idle(self, device) -> torch.Tensor:
        """``[K]`` bool: experts that received no row (a mask on the device)."""
        return self._memo("idle", device, lambda: self.device_counts(device).eq(0))


@lru_cache(maxsize=None)
def available(device_type: str, device_index, dtype: torch.dtype) -> bool:
    """Whether torch runs ``torch._grouped_mm`` as one fused kernel here: bf16 on CUDA
    devices of compute capability 9.x or 10.x (torch 2.13's fused kernels)."""
    if device_type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index)
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    try:  # the kernels also constrain shapes and versions; ask them once
        a = torch.zeros(16, 16, device=device, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        torch._grouped_mm(a.t(), a, offs=offs)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight[e].T`` for stacked ``weight [K, out, in]`` runs on the kernel."""
    # one group an expert, each a [out, in] matrix; rows 16-byte aligned (8 bf16)
    return (
        x.dtype == weight.dtype
        and weight.dim() == 3
        and weight.size(0) <= MAX_GROUPS
        and weight.size(1) % 8 == 0
        and weight.size(2) % 8 == 0
        and available(x.device.type, x.device.index, x.dtype)
    )


def linear(x, weight, bias, rows: ExpertRows):
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]``, one fused kernel."""
    # x: [S, in], weight: [K, out, in], bias: [K, out] -> [S, out]
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=rows.offsets(x.device))
    return y.add_(bias.index_select(0, rows.expert_of_row(x.device)))


def linear_backward(grad_y, x, weight, rows: ExpertRows, needs):
    """Gradients of :func:`linear` for ``x``, ``weight`` and ``bias`` (None where not ``needs``).

    The bias gradient is a grouped product with columns of ones: the kernel
    sums an expert's rows in float32 and rounds once (``index_add_`` in bf16
    rounds after every row on CUDA).
    """
    need_x, need_w, need_b = needs
    offs = rows.offsets(x.device)
    grad_x = torch._grouped_mm(grad_y, weight, offs=offs) if need_x else None
    grad_w = torch._grouped_mm(grad_y.t(), x, offs=offs) if need_w else None
    grad_b = None
    if need_b:  # 8 columns of ones: the kernel wants 16-byte rows
        ones = grad_y.new_ones(grad_y.size(0), 8)
        grad_b = torch._grouped_mm(grad_y.t(), ones, offs=offs)[..., 0].contiguous()
    if 0 in rows.counts:  # an empty group's output is not promised to be zero
        idle = rows.idle(x.device)
        if grad_w is not None:
            grad_w.masked_fill_(idle.view(-1, 1, 1), 0)
        if grad_b is not None:
            grad_b.masked_fill_(idle.view(-1, 1), 0)
    return grad_x, grad_w, grad_b
