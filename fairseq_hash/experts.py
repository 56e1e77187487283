"""K expert FFNs with the dense FFN's shape, computed on tokens sorted by expert.

    experts = ExpertFFN(total_experts=16, embed_dim=512, ffn_dim=2048)
    y = experts(x_sorted, counts)   # x_sorted: [S, d], counts: K ints summing to S
                                    # (or a grouped_mm.ExpertRows)

The experts' weights are stacked (``fc1_weight [K, f, d]``, ``fc2_weight
[K, d, f]``), and each linear map runs as one grouped product: expert e
multiplies its own contiguous slice of rows. The grouped product is a custom
autograd function whose backward allocates the stacked weight gradient once and
writes each expert's slice in place (autograd through ``weight[e]`` indexing
would allocate a full ``[K, f, d]`` gradient for every expert). Experts know
nothing of routing.

Three ways to compute, chosen per call:

- torch's grouped matrix product, one kernel for all experts and each linear
  map, where torch fuses it (``grouped_mm.py``: CUDA, bf16, compute
  capability 9.x/10.x, fewer than 1024 groups);
- elsewhere (CPU), with a ReLU or GELU activation and no active activation
  dropout (fairseq's default), :class:`GroupedFFN`: the whole FFN expert by
  expert, so that an expert's hidden rows ``[n_e, f]`` are still in cache when
  the activation and fc2 read them, as in K separate dense FFNs. Running fc1
  for all S tokens first would stream the ``[S, f]`` hidden tensor through
  memory twice more, for the activation and for its backward;
- otherwise two :class:`GroupedLinear` products, a portable loop of
  ``addmm``/``mm`` over the experts' row slices writing into preallocated
  outputs, with any activation and dropout module between them. (On CPU
  torch's grouped product is itself such a loop, and its autograd backward
  fails on CPU in torch 2.13.)

On CPU the loops over experts run in groups on a pool of threads
(``expert_threads.py``), and the stacked weight gradients reuse their last
memory (``grad_buffers.py``).

The weights have the model's dtype (fairseq's ``--fp16``/``--bf16`` convert
them with the rest of the model). Under autocast (``--amp``) the product runs
in autocast's dtype, like ``nn.Linear``, and gradients reach the fp32 weights.
"""
import math
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import grouped_mm
from .grouped_mm import ExpertRows
from .expert_shards import is_rows, read_rows
from .expert_threads import for_expert_groups
from .grad_buffers import weight_grad_buffer


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
        # (or [K, N, out]) -> y: [S, out]; rows: an ExpertRows
        ctx.save_for_backward(x, weight)
        ctx.rows = rows  # they cover every row: the dispatch hands over kept rows only
        counts = rows.counts
        ctx.grouped = grouped_mm.usable(x, weight)
        if ctx.grouped:
            return grouped_mm.linear(x, weight, bias, rows)
        y = x.new_empty(x.size(0), weight.size(-2))

        def work(bounds):
            for e, lo, hi in bounds:
                torch.addmm(_of_expert(bias, e, 1), x[lo:hi], _of_expert(weight, e, 2).t(),
                            out=y[lo:hi])

        for_expert_groups(x.device, counts, work)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.grouped:
            return (*grouped_mm.linear_backward(grad_y, x, weight, ctx.rows,
                                                (need_x, need_w, need_b)), None)
        grad_x = x.new_empty(x.shape) if need_x else None
        # empty, not zeros: a memset of [K, out, in] costs as much as a small
        # expert's product; only experts that received no token are zeroed
        # (a view's gradient keeps the view's strides: empty_like preserves them)
        grad_w = weight_grad_buffer(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:-1]) if need_b else None
        counts = ctx.rows.counts
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
    """``counts``: K ints, or an :class:`~fairseq_hash.grouped_mm.ExpertRows`."""
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
    the ``local_experts`` experts ``[first_expert, first_expert +
    local_experts)`` of ``total_experts``. Expert e's initial weights come from a generator of its
    own, seeded by ``seed`` and its global id alone, so a model starts the same
    on any number of ranks and leaves torch's global random state alone. A
    state dict may hold all experts (a one-file checkpoint) or refer to the
    files of a sharded one (:mod:`fairseq_hash.expert_shards`): loading keeps,
    or reads, this rank's rows only.

    Args:
        total_experts (int): K, the experts of the layer (all shards together)
        embed_dim (int): d, the model width
        ffn_dim (int): f, the hidden width of every expert (the dense FFN's)
        activation_fn (callable): the activation between fc1 and fc2
        activation_dropout (nn.Module): dropout on the activations
        seed (int): seed of the initial weights
        shard, num_shards (int): which of the equal parts of the K experts this holds
    """

    def __init__(self, total_experts, embed_dim, ffn_dim, activation_fn=F.relu,
                 activation_dropout=None, seed=0, shard=0, num_shards=1):
        super().__init__()
        if total_experts % num_shards:
            raise ValueError(f"{total_experts} experts do not split into {num_shards} shards")
        self.total_experts = total_experts
        self.local_experts = total_experts // num_shards  # held here
        self.first_expert = shard * self.local_experts
        self.seed = seed
        L = self.local_experts
        self.fc1_weight = nn.Parameter(torch.empty(L, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(L, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(L, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(L, embed_dim))
        self.activation_fn = activation_fn
        self.activation_dropout = activation_dropout or nn.Identity()
        self.rows_source = {}  # parameter name -> the sharded checkpoint it was read from
        for p in self.parameters():
            # so fairseq's data-parallel wrappers know not to sync their gradients
            p.expert = True
        self.reset_parameters()

    @property
    def bins(self) -> int:
        """The expert ids of rows this module computes: its local experts."""
        return self.local_experts

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
        # this rank's rows: read from a sharded checkpoint's files, or cut from
        # the whole [K, ...] stacks of a one-file checkpoint
        held, first = self.fc1_weight.size(0), self.first_expert
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            value = state_dict.get(prefix + name)
            if is_rows(value):
                self.rows_source[name] = value  # where its optimizer state is, too
                state_dict[prefix + name] = read_rows(value, first, held)
            elif (value is not None and held != self.total_experts
                  and value.size(0) == self.total_experts):
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
        counts = ExpertRows.of(counts)  # made once for fc1 and fc2
        activation = fused_activation(self.activation_fn)
        if (activation is not None and dropout_inactive(self.activation_dropout)
                and not grouped_mm.usable(x, self.fc1_weight)):
            return grouped_ffn(x, self.fc1_weight, self.fc1_bias, self.fc2_weight,
                               self.fc2_bias, counts, activation)
        h = grouped_linear(x, self.fc1_weight, self.fc1_bias, counts)  # [S, f]
        h = self.activation_dropout(self.activation_fn(h))
        return grouped_linear(h, self.fc2_weight, self.fc2_bias, counts)  # [S, d]
