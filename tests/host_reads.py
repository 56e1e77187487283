"""Count the reads of tensor values into Python during a training step (tests/test_host_reads.py).

    with HostReads() as reads:
        ...                       # forward and backward
    reads.total, reads.inside     # all reads; reads made inside a hash layer

On a GPU each such read waits for the device. A read is a tensor method that
hands a value to Python (``item``, ``tolist``, ``__int__``, ``__bool__``,
``__index__``, ``__float__``), or an operation whose output size depends on
tensor values and so must read them (``nonzero``, boolean indexing,
``repeat_interleave`` without ``output_size``, ``bincount``: it reads its input's
min and max, two waits a call on a GPU, counted by ``benchmarks/gpu_check.sh``). Reads inside torch's C++ code
are not seen by a TorchFunctionMode; the list above covers the ones Python
code of ours could make.
"""
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__int__", "__bool__", "__index__", "__float__", "nonzero",
         "masked_select", "unique", "bincount"}
# files of the hash layers, relative to fairseq_hash/ (one ending in "/": every file of
# that package): a read with one of them on the stack is inside a layer
LAYER_FILES = ("moe_layer.py", "experts.py", "expert_parallel/", "fairscale_dispatch.py",
               "multihash.py", "shared_experts.py", "routers.py", "scores.py")
PLANNER = "plan_hash_dispatch"  # the one read of the forward pass


def in_layer(filename):
    """Whether ``filename``, a file of fairseq_hash, is one of LAYER_FILES."""
    path = filename.rsplit(os.sep + "fairseq_hash" + os.sep, 1)[-1].replace(os.sep, "/")
    return any(path == f or f.endswith("/") and path.startswith(f) for f in LAYER_FILES)


def _is_read(func, args, kwargs):
    name = getattr(func, "__name__", "")
    if name in READS:
        return True
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return torch.is_tensor(repeats) and kwargs.get("output_size") is None
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)
    return False


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []  # (function name, innermost frame of ours, planned, inside a layer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_read(func, args, kwargs):
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in stack if os.sep + "fairseq_hash" + os.sep in f.filename]
            planned = any(f.name == PLANNER for f in ours)
            inside = not planned and any(in_layer(f.filename) for f in ours)
            where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else stack[-1].filename
            self.reads.append((getattr(func, "__name__", str(func)), where, planned, inside))
        return func(*args, **kwargs)

    @property
    def total(self):
        return len(self.reads)

    @property
    def planned(self):
        return [r for r in self.reads if r[2]]

    @property
    def inside(self):
        return [r for r in self.reads if r[3]]


def training_step(model, tokens):
    """fairseq's language-model forward and a loss's backward on ``tokens [B, T]``."""
    logits, _ = model(tokens)
    logits.float().logsumexp(-1).sum().backward()
