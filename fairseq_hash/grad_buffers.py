"""CPU: the stacked expert weights' gradients reuse the memory of the last ones.

    grad_w = weight_grad_buffer(weight)   # where a backward writes weight's gradient

The one place that asks torch how many tensors share a storage (a private
call, ``torch._C._storage_Use_Count``); without it every backward gets fresh
memory, as it would anyway.
"""
import torch


def _storage_owners(t: torch.Tensor) -> int:
    """Tensors and storages holding ``t``'s memory, ``t`` included."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # less the one just made


def weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """Memory for the gradient of a stacked weight: the last one's, where it is free.

    fairseq drops every gradient after the update (``p.grad = None``), so each
    backward would ask for a fresh ``[K, f, d]`` tensor, which on CPU the
    kernel maps and zeroes page by page as the products first write it. A CPU
    parameter keeps its last gradient's memory and lends it again when nothing
    else holds it: ``.grad`` was dropped and nobody kept a reference. Autograd receives a new tensor on that memory and
    makes it the new ``.grad``. (On CUDA, torch's caching allocator already
    reuses memory.)
    """
    if (weight.device.type != "cpu" or not weight.is_leaf
            or not hasattr(torch._C, "_storage_Use_Count")):  # private to torch: may go
        return torch.empty_like(weight)
    buffer = getattr(weight, "_fairseq_hash_grad", None)
    if (buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype
            or _storage_owners(buffer) > 1):
        buffer = torch.empty_like(weight)
        weight._fairseq_hash_grad = buffer
    return buffer.view(buffer.shape)
