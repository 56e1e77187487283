"""K expert FFNs with the dense FFN's shape, computed on tokens sorted by expert.

    experts = ExpertFFN(num_experts=16, embed_dim=512, ffn_dim=2048)
    y = experts(x_sorted, counts)   # x_sorted: [S, d], counts: K ints summing to S

The experts' weights are stacked (``fc1_weight [K, f, d]``, ``fc2_weight
[K, d, f]``), and each linear map runs as one grouped product: expert e
multiplies its own contiguous slice of rows. The grouped product is a custom
autograd function whose backward allocates the stacked weight gradient once and
writes each expert's slice in place. (Autograd through ``weight[e]`` indexing
would allocate a full ``[K, f, d]`` gradient for every expert: 22x slower than
dense at K=64 in a prototype.) Experts know nothing of routing.

Three ways to compute, chosen per call:

- torch's grouped matrix product (``torch._grouped_mm``), one kernel for all
  experts and each linear map, only where torch fuses it: CUDA, bf16, compute
  capability 9.x or 10.x and fewer than 1024 groups (MultiHash with K*N >= 1024
  narrow experts takes the paths below). Elsewhere torch runs it as a loop of
  products that copies the offsets to the host on every call;
- elsewhere (CPU), with a ReLU or GELU activation and no active activation
  dropout (fairseq's default), :class:`GroupedFFN`: the whole FFN expert by
  expert, so that an expert's hidden rows ``[n_e, f]`` are still in cache when
  the activation and fc2 read them, as in K separate dense FFNs. Running fc1
  for all S tokens first would stream the ``[S, f]`` hidden tensor through
  memory twice more: the activation and its backward cost 5x those of K
  separate FFNs at 8192 tokens (profiled on CPU, one thread);
- otherwise two :class:`GroupedLinear` products, a portable loop of
  ``addmm``/``mm`` over the experts' row slices writing into preallocated
  outputs, with any activation and dropout module between them. (On CPU
  torch's grouped product is itself such a loop, and its autograd backward
  fails on CPU in torch 2.13.)

The weights have the model's dtype (fairseq's ``--fp16``/``--bf16`` convert
them with the rest of the model). Under autocast (``--amp``) the product runs
in autocast's dtype, like ``nn.Linear``, and gradients reach the fp32 weights.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def to_device(values: List[int], device) -> torch.Tensor:
    """Host ints as a long tensor on ``device``, without waiting for the device
    (through pinned memory on CUDA; a plain copy from pageable memory blocks)."""
    host = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class ExpertRows:
    """Rows of each expert in a batch sorted by expert: ``counts`` as Python ints,
    and the device tensors the grouped product needs, made once and shared by
    fc1, fc2 and their backward (and by a ``--checkpoint-activations`` rerun).

    ``device_counts`` (the same counts, on the device) spares a copy from the
    host where the caller has them; otherwise they are copied without waiting
    for the device (from pinned memory on CUDA).
    """

    def __init__(self, counts: List[int], device_counts: Optional[torch.Tensor] = None):
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self._device_counts = device_counts
        self._made = {}

    @classmethod
    def of(cls, counts) -> "ExpertRows":
        return counts if isinstance(counts, ExpertRows) else cls(counts)

    def __len__(self):
        return len(self.counts)

    def _memo(self, name, device, make):
        key = (name, device)
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def device_counts(self, device) -> torch.Tensor:
        def make():
            if self._device_counts is not None:
                return self._device_counts.to(device)
            return to_device(self.counts, device)
        return self._memo("counts", device, make)

    def offsets(self, device) -> torch.Tensor:
        """``[K]`` int32 end row of each expert (torch._grouped_mm's ``offs``)."""
        return self._memo("offsets", device,
                          lambda: self.device_counts(device).cumsum(0).to(torch.int32))

    def expert_of_row(self, device) -> torch.Tensor:
        """``[S]`` the expert of each row."""
        return self._memo("rows", device, lambda: torch.repeat_interleave(
            torch.arange(len(self.counts), device=device), self.device_counts(device),
            output_size=self.total))

    def idle(self, device) -> torch.Tensor:
        """``[K]`` bool: experts that received no row (a device-side mask)."""
        return self._memo("idle", device, lambda: self.device_counts(device).eq(0))


def _bounds(counts: List[int]):
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


_POOL = None  # (threads, ThreadPoolExecutor) running the expert groups
_WORKER = threading.local()  # .threads: the intra-op threads a pool worker was given


def expert_threads() -> int:
    """Threads for experts on CPU: $FAIRSEQ_HASH_EXPERT_THREADS, else torch's threads."""
    return int(os.environ.get("FAIRSEQ_HASH_EXPERT_THREADS", 0)) or torch.get_num_threads()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One worker a thread, made once: remade only if the thread count changes,
    never with the number of experts that received tokens (every decoding step)."""
    global _POOL
    if _POOL is None or _POOL[0] != threads:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        # torch sets a thread's intra-op count from the process's on the
        # thread's first parallel op; done here, it cannot undo a share later
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="fairseq-hash-experts",
                                             initializer=torch.get_num_threads))
    return _POOL[1]


def _run_group(work: Callable, group, share: int, changed: list):
    """``work(group)`` in a pool worker, with ``share`` intra-op threads.

    torch's intra-op thread count is per thread with its OpenMP backend (the
    default on Linux, macOS and Windows): ``torch.set_num_threads`` sets the
    calling thread's OpenMP and MKL counts, which only this worker reads. It
    also sets the count that threads started later take up, so the caller
    gives the process's count back (``changed``) once the groups are done.
    """
    if getattr(_WORKER, "threads", None) != share:
        changed.append(share)
        torch.set_num_threads(share)
        _WORKER.threads = share
    with torch.no_grad():  # grad mode is per thread; these are out= products
        work(group)


def for_expert_groups(device: torch.device, counts: List[int], work: Callable):
    """Call ``work(bounds)`` on groups of experts covering all rows.

    On CPU the experts are split into groups of about equal rows, at most one
    a thread, and the groups run at once, each with its share of the threads
    (with 2 threads and 16 experts: 2 groups of 1 thread; with 32 threads and
    4 experts: 4 groups of 8). An expert's products are small (S/K rows); run
    one after another, each with all threads, every product ends in a barrier
    where all threads wait for the slowest, and on a shared machine that is
    one descheduled thread: K=64 ran 5.8x slower that way than in groups on 2
    busy cores (BENCHMARKS.md). Elsewhere, and for one group, ``work`` runs
    here on all experts.
    """
    bounds = list(_bounds(counts))
    if not bounds:
        return
    threads = expert_threads() if device.type == "cpu" else 1
    workers = min(threads, len(bounds))
    if workers <= 1:
        work(bounds)
        return
    total = sum(hi - lo for _, lo, hi in bounds)
    groups = [[] for _ in range(workers)]
    for e, lo, hi in bounds:  # contiguous runs of experts, split at equal rows
        groups[min(workers - 1, (lo + hi) * workers // (2 * total))].append((e, lo, hi))
    groups = [g for g in groups if g]
    shares = [threads // len(groups) + (i < threads % len(groups)) for i in range(len(groups))]
    changed = []
    futures = [_pool(threads).submit(_run_group, work, g, share, changed)
               for g, share in zip(groups, shares)]
    wait(futures)
    if changed:
        torch.set_num_threads(torch.get_num_threads())  # this thread's count is the process's
    for future in futures:
        future.result()  # a worker's error is raised here


def _storage_owners(t: torch.Tensor) -> int:
    """Tensors and storages holding ``t``'s memory, ``t`` included."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # less the one just made


def weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """Memory for the gradient of a stacked weight: the last one's, where it is free.

    fairseq drops every gradient after the update (``p.grad = None``), so each
    backward would ask for a fresh ``[K, f, d]`` tensor, which on CPU the
    kernel maps and zeroes page by page as the products first write it (268 MB
    at K=64, d=512, f=2048). A CPU parameter keeps its last gradient's memory
    and lends it again when nothing else holds it: ``.grad`` was dropped and
    nobody kept a reference. Autograd receives a new tensor on that memory and
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


# torch fuses its grouped product for fewer groups only; above, it loops
GROUPED_MM_MAX_GROUPS = 1023


@lru_cache(maxsize=None)
def grouped_mm_available(device_type: str, device_index, dtype: torch.dtype) -> bool:
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


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # one group an expert, each a [out, in] matrix; rows 16-byte aligned (8 bf16)
    return (
        x.dtype == weight.dtype
        and weight.dim() == 3
        and weight.size(0) <= GROUPED_MM_MAX_GROUPS
        and weight.size(1) % 8 == 0
        and weight.size(2) % 8 == 0
        and grouped_mm_available(x.device.type, x.device.index, x.dtype)
    )


def grouped_mm_linear(x, weight, bias, rows: "ExpertRows"):
    """``y = x @ weight[e].T + bias[e]`` over each expert's rows, one fused kernel."""
    # x: [S, in], weight: [K, out, in], bias: [K, out] -> [S, out]
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=rows.offsets(x.device))
    return y.add_(bias.index_select(0, rows.expert_of_row(x.device)))


def grouped_mm_linear_backward(grad_y, x, weight, rows: "ExpertRows", need_x, need_w, need_b):
    """Gradients of :func:`grouped_mm_linear`, each one fused kernel.

    The bias gradient is a grouped product with a column of ones: the kernel
    sums an expert's rows in float32 and rounds once (an ``index_add_`` in bf16
    would round at every row).
    """
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


def _of_expert(t: torch.Tensor, e: int, dims: int) -> torch.Tensor:
    """Expert e's matrix (``dims=2``) or bias (``dims=1``) in a stack ``[K, ...]``,
    or in ``[K, N, ...]``: N segments of each of K experts, expert e being
    segment ``e % N`` of ``e // N`` (MultiHash, where no flat ``[K*N, ...]``
    view of the segments exists)."""
    return t[e] if t.dim() == dims + 1 else t[e // t.size(1), e % t.size(1)]


class GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]`` for every expert e."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        # x: [S, in], weight: [K, out, in] (or [K, N, out, in]), bias: [K, out]
        # (or [K, N, out]) -> y: [S, out]
        ctx.save_for_backward(x, weight)
        ctx.rows = rows  # every row: the dispatch hands over kept rows only
        ctx.grouped = _use_grouped_mm(x, weight)
        if ctx.grouped:
            return grouped_mm_linear(x, weight, bias, rows)
        y = x.new_empty(x.size(0), weight.size(-2))

        def work(bounds):
            for e, lo, hi in bounds:
                torch.addmm(_of_expert(bias, e, 1), x[lo:hi], _of_expert(weight, e, 2).t(),
                            out=y[lo:hi])

        for_expert_groups(x.device, rows.counts, work)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.grouped:
            return (*grouped_mm_linear_backward(grad_y, x, weight, ctx.rows, need_x, need_w,
                                                need_b), None)
        counts = ctx.rows.counts
        grad_x = x.new_empty(x.shape) if need_x else None
        # empty, not zeros: a memset of [K, out, in] costs as much as a small
        # expert's product; only experts that received no token are zeroed
        # (a view's gradient keeps the view's strides: empty_like preserves them)
        grad_w = weight_grad_buffer(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:-1]) if need_b else None
        for e, count in enumerate(counts):
            if count == 0:
                if grad_w is not None:
                    _of_expert(grad_w, e, 2).zero_()
                if grad_b is not None:
                    _of_expert(grad_b, e, 1).zero_()

        def work(bounds):
            for e, lo, hi in bounds:
                g = grad_y[lo:hi]
                if grad_x is not None:
                    torch.mm(g, _of_expert(weight, e, 2), out=grad_x[lo:hi])
                if grad_w is not None:
                    torch.mm(g.t(), x[lo:hi], out=_of_expert(grad_w, e, 2))
                if grad_b is not None:
                    torch.sum(g, dim=0, out=_of_expert(grad_b, e, 1))

        for_expert_groups(x.device, counts, work)
        return grad_x, grad_w, grad_b, None


class GroupedFFN(torch.autograd.Function):
    """``fc2(act(fc1(x)))`` for every expert's rows, one expert at a time.

    Saves the hidden activations ``[S, f]`` for backward (post-ReLU, or
    pre-GELU), as the unfused layers would; backward recomputes nothing for
    ReLU and one GELU per expert slice.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts, activation):
        # x: [S, d] -> hidden: [S, f] -> y: [S, d]
        hidden = x.new_empty(x.size(0), w1.size(1))
        y = x.new_empty(x.size(0), w2.size(1))

        def work(bounds):
            for e, lo, hi in bounds:
                h = torch.addmm(b1[e], x[lo:hi], w1[e].t(), out=hidden[lo:hi])
                h = h.clamp_(min=0) if activation == "relu" else F.gelu(h)
                torch.addmm(b2[e], h, w2[e].t(), out=y[lo:hi])

        for_expert_groups(x.device, counts, work)
        ctx.save_for_backward(x, w1, w2, hidden)
        ctx.counts, ctx.activation = counts, activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, hidden = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grads = [weight_grad_buffer(w1) if need_w1 else None,
                 w1.new_empty(w1.shape[:2]) if need_b1 else None,
                 weight_grad_buffer(w2) if need_w2 else None,
                 w2.new_empty(w2.shape[:2]) if need_b2 else None]
        for e, count in enumerate(ctx.counts):
            if count == 0:  # an expert that received no token gets an exact zero
                for g in grads:
                    if g is not None:
                        g[e].zero_()
        grad_w1, grad_b1, grad_w2, grad_b2 = grads

        def work(bounds):
            # one [n_e, f] buffer for the hidden gradient of this group's experts
            buffer = grad_y.new_empty(max(hi - lo for _, lo, hi in bounds), w1.size(1))
            for e, lo, hi in bounds:
                g = grad_y[lo:hi]
                h = hidden[lo:hi] if ctx.activation == "relu" else F.gelu(hidden[lo:hi])
                if grad_w2 is not None:
                    torch.mm(g.t(), h, out=grad_w2[e])
                if grad_b2 is not None:
                    torch.sum(g, dim=0, out=grad_b2[e])
                grad_h = torch.mm(g, w2[e], out=buffer[: hi - lo])
                if ctx.activation == "relu":
                    torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0, grad_input=grad_h)
                else:
                    torch.ops.aten.gelu_backward.grad_input(grad_h, hidden[lo:hi],
                                                            grad_input=grad_h)
                if grad_w1 is not None:
                    torch.mm(grad_h.t(), x[lo:hi], out=grad_w1[e])
                if grad_b1 is not None:
                    torch.sum(grad_h, dim=0, out=grad_b1[e])
                if grad_x is not None:
                    torch.mm(grad_h, w1[e], out=grad_x[lo:hi])

        for_expert_groups(x.device, ctx.counts, work)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


@contextmanager
def _autocast_by_hand(device_type: str, *tensors):
    """nn.Linear's autocast rule (compute in autocast's dtype), applied by hand:
    autocast does not reach the ``out=`` products inside the functions above."""
    if not (torch.amp.is_autocast_available(device_type)  # not on meta tensors
            and torch.is_autocast_enabled(device_type)):
        yield tensors
        return
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        yield tuple(t.to(dtype) for t in tensors)


def _rows_of(x, counts) -> ExpertRows:
    rows = ExpertRows.of(counts)
    if rows.total != x.size(0):
        raise ValueError(f"expert counts {rows.counts} do not cover the {x.size(0)} rows")
    return rows


def grouped_linear(x, weight, bias, counts):
    """``counts``: K ints, or an :class:`ExpertRows`."""
    rows = _rows_of(x, counts)
    with _autocast_by_hand(x.device.type, x, weight, bias) as (x, weight, bias):
        return GroupedLinear.apply(x, weight, bias, rows)


def grouped_ffn(x, w1, b1, w2, b2, counts, activation: str):
    rows = _rows_of(x, counts)
    with _autocast_by_hand(x.device.type, x, w1, b1, w2, b2) as (x, w1, b1, w2, b2):
        return GroupedFFN.apply(x, w1, b1, w2, b2, rows.counts, activation)


def fused_activation(fn) -> Optional[str]:
    """"relu" or "gelu" where ``fn`` is one GroupedFFN computes, else None."""
    if fn in (F.relu, torch.relu):
        return "relu"
    if fn is F.gelu or (getattr(fn, "__module__", "") == "fairseq.modules.gelu"
                        and getattr(fn, "__name__", "") == "gelu"):
        return "gelu"  # fairseq's gelu is F.gelu computed in float32
    return None


def dropout_inactive(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity) or getattr(module, "p", None) == 0:
        return True
    # fairseq's FairseqDropout may apply itself at inference too
    return not module.training and not getattr(module, "apply_during_inference", False)


class ExpertFFN(nn.Module):
    """K position-wise FFNs ``fc2(dropout(act(fc1(x))))`` stored stacked.

    Under expert parallelism a rank holds shard ``shard`` of ``num_shards``:
    the experts ``[first_expert, first_expert + num_experts)`` of
    ``total_experts``. Expert e's initial weights come from a generator of its
    own, seeded by ``seed`` and its global id alone, so a model starts the same
    on any number of ranks and leaves torch's global random state alone. A
    state dict may hold all experts (a checkpoint written on any number of
    ranks): loading keeps this rank's rows.

    Args:
        num_experts (int): K, the experts of the layer (all shards together)
        embed_dim (int): d, the model width
        ffn_dim (int): f, the hidden width of every expert (the dense FFN's)
        activation_fn (callable): the activation between fc1 and fc2
        activation_dropout (nn.Module): dropout on the activations
        seed (int): seed of the initial weights
        shard, num_shards (int): which of the equal parts of the K experts this holds
    """

    def __init__(self, num_experts, embed_dim, ffn_dim, activation_fn=F.relu,
                 activation_dropout=None, seed=0, shard=0, num_shards=1):
        super().__init__()
        if num_experts % num_shards:
            raise ValueError(f"{num_experts} experts do not split into {num_shards} shards")
        self.total_experts = num_experts
        self.num_experts = num_experts // num_shards  # held here
        self.first_expert = shard * self.num_experts
        self.seed = seed
        L = self.num_experts
        self.fc1_weight = nn.Parameter(torch.empty(L, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(L, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(L, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(L, embed_dim))
        self.activation_fn = activation_fn
        self.activation_dropout = activation_dropout or nn.Identity()
        for p in self.parameters():
            # so fairseq's data-parallel wrappers know not to sync their gradients
            p.expert = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # each expert starts like a fresh nn.Linear, as fairseq's dense FFN does
        for e in range(self.fc1_weight.size(0)):
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.first_expert + e) % 2**63)
            for weight, bias in ((self.fc1_weight, self.fc1_bias),
                                 (self.fc2_weight, self.fc2_bias)):
                bound = 1.0 / math.sqrt(weight.size(-1))
                weight[e].copy_(nn.init.kaiming_uniform_(
                    torch.empty(weight.shape[1:]), a=math.sqrt(5), generator=gen))
                bias[e].copy_(torch.empty(bias.shape[1:]).uniform_(-bound, bound, generator=gen))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        held, first = self.fc1_weight.size(0), self.first_expert
        if held != self.total_experts:  # a shard: keep this rank's rows
            for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                value = state_dict.get(prefix + name)
                if value is not None and value.size(0) == self.total_experts:
                    state_dict[prefix + name] = value[first:first + held]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear, expert=None):
        """Copy a dense FFN's weights into one expert FFN (or all of them)."""
        experts = range(self.fc1_weight.size(0)) if expert is None else [expert]
        for e in experts:
            self.fc1_weight[e].copy_(fc1.weight)
            self.fc1_bias[e].copy_(fc1.bias)
            self.fc2_weight[e].copy_(fc2.weight)
            self.fc2_bias[e].copy_(fc2.bias)

    def forward(self, x: torch.Tensor, counts) -> torch.Tensor:
        # x: [S, d] sorted by expert; counts[e] rows for expert e (ints or ExpertRows)
        counts = ExpertRows.of(counts)
        activation = fused_activation(self.activation_fn)
        if (activation is not None and dropout_inactive(self.activation_dropout)
                and not _use_grouped_mm(x, self.fc1_weight)):
            return grouped_ffn(x, self.fc1_weight, self.fc1_bias, self.fc2_weight,
                               self.fc2_bias, counts, activation)
        h = grouped_linear(x, self.fc1_weight, self.fc1_bias, counts)  # [S, f]
        h = self.activation_dropout(self.activation_fn(h))
        return grouped_linear(h, self.fc2_weight, self.fc2_bias, counts)  # [S, d]
