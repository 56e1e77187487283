"""GPU: torch's grouped matrix product, one kernel for all experts of a linear map.

    if grouped_mm.usable(x, weight):                           # weight: [K, out, in]
        y, saved = grouped_mm.linear(x, weight, bias, counts)  # x: [S, in] -> y: [S, out]
        grad_x, grad_w, grad_b = grouped_mm.linear_backward(grad_y, x, weight, counts, saved,
                                                            needs)

The one place that calls ``torch._grouped_mm``, private to torch: it takes
``offs``, the cumulative end row of each expert's slice as int32, and no bias.
It is used where the device has a native kernel (CUDA, bf16, compute
capability 8.0 or newer), probed once per device and dtype; everywhere else
the experts' products are a loop over their row slices (``experts.py``).
"""
from functools import lru_cache
from typing import List

import torch


@lru_cache(maxsize=None)
def available(device_type: str, device_index, dtype: torch.dtype) -> bool:
    """Whether torch has a native grouped matrix product for this device and dtype."""
    if device_type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index)
    if torch.cuda.get_device_capability(device)[0] < 8:
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
    # the kernel wants 16-byte aligned rows
    return (
        x.dtype == weight.dtype
        and weight.size(1) % 8 == 0
        and weight.size(2) % 8 == 0
        and available(x.device.type, x.device.index, x.dtype)
    )


def linear(x, weight, bias, counts: List[int]):
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]``; returns ``(y, saved)``,
    ``saved`` being what :func:`linear_backward` needs besides the inputs."""
    offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(
        torch.arange(len(counts), device=x.device),
        torch.tensor(counts, device=x.device), output_size=sum(counts),
    )  # [S] expert of each row
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return y.add_(bias.index_select(0, rows)), (offsets, rows)


def linear_backward(grad_y, x, weight, counts: List[int], saved, needs):
    """Gradients of :func:`linear` for ``x``, ``weight`` and ``bias`` (None where not ``needs``)."""
    (offsets, rows), (need_x, need_w, need_b) = saved, needs
    grad_x = torch._grouped_mm(grad_y, weight, offs=offsets) if need_x else None
    grad_w = torch._grouped_mm(grad_y.t(), x, offs=offsets) if need_w else None
    if grad_w is not None:
        idle = [e for e, count in enumerate(counts) if count == 0]
        if idle:  # an empty group's output is not promised to be zero
            grad_w[idle] = 0
    grad_b = None
    if need_b:
        grad_b = grad_y.new_zeros(weight.size(0), weight.size(1))
        grad_b.index_add_(0, rows, grad_y)
    return grad_x, grad_w, grad_b
