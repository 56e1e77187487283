"""The exchange: sorted tokens to their experts' ranks and back, through
fairscale's padded all-to-all or torch's ``all_to_all_single`` with exact split
sizes (:class:`AllToAllExchange`)."""
from typing import List, Optional

import torch
import torch.distributed as dist
from fairscale.nn.moe.moe_layer import _AllToAll

from ..grouped_mm import to_device
from ..route import LayerPlan, expert_counts
from .layout import ExpertLayout

def gather_counts(counts: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``[..., E]`` counts of this rank -> ``[P, ..., E]`` of every rank in the group."""
    out = [torch.empty_like(counts) for _ in range(layout.parallel_size)]
    dist.all_gather(out, counts.contiguous(), group=layout.group)
    return torch.stack(out)


def _segment_rows(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenated ``arange(s, s + n)`` for every (start, length) pair; ``total`` rows."""
    offsets = lengths.cumsum(0) - lengths
    return (torch.arange(total, device=starts.device)
            + torch.repeat_interleave(starts - offsets, lengths, output_size=total))


class ExchangeSizes:
    """Who sends whom how many rows, as Python ints, from every rank's counts.

    ``everyone[s][e]``: rows rank s of the expert group sends expert e. With L
    experts a rank, ``pair[s][r]`` rows go from rank s to rank r; fairscale's
    all-to-all pads every pair to the largest, ``capacity``.
    """

    def __init__(self, everyone: List[List[int]], me: int, local_experts: int):
        P, L = len(everyone), local_experts
        self.pair = [[sum(row[r * L:(r + 1) * L]) for r in range(P)] for row in everyone]
        self.capacity = max(max(row) for row in self.pair)
        self.send = self.pair[me]  # [P] rows this rank sends each rank
        self.kept = sum(self.send)
        self.receive = [row[me] for row in self.pair]  # [P] rows each rank sends this one
        # rows from each source for each local expert: [P][L]
        self.recv = [row[me * L:(me + 1) * L] for row in everyone]
        self.per_expert = [sum(col) for col in zip(*self.recv)]  # [L] rows of each local expert

    @property
    def rows_on_the_wire(self) -> int:
        """Rows this rank's padded buffer holds, each way (blocks for itself included)."""
        return len(self.pair) * self.capacity


class _AllToAllSplit(torch.autograd.Function):
    """torch's ``all_to_all_single`` with split sizes known on the host; its backward
    is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, group, x, output_splits: List[int], input_splits: List[int]):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        out = x.new_empty(sum(output_splits), x.size(1))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return None, _AllToAllSplit.apply(ctx.group, grad, input_splits, output_splits), None, None


class AllToAllExchange:
    """Dropless dispatch of sorted tokens to their experts' ranks and back.

    ``exact=False`` (``--moe-dispatch alltoall``): fairscale's all-to-all, every
    block padded to the step's largest. ``exact=True`` (``--moe-dispatch
    alltoall-exact``): torch's ``all_to_all_single`` with the planned split
    sizes, so only rows with a token travel.
    """

    def __init__(self, layout: ExpertLayout, exact: bool = False):
        self.layout = layout
        self.exact = exact
        self.last_sizes = None  # ExchangeSizes of the last forward (benchmarks read it)

    def sizes(self, flat: torch.Tensor, experts, plan: Optional[LayerPlan] = None) -> ExchangeSizes:
        """The exchange's sizes: a hash layer's from its plan, else one all-gather and one read."""
        P, L = self.layout.parallel_size, experts.bins
        if plan is not None:
            everyone = plan.everyone
        else:  # a learned router decides in the layer
            counts = expert_counts(flat, P * L + 1)[:P * L]
            everyone = gather_counts(counts, self.layout).tolist()  # [P][E]
        return ExchangeSizes(everyone, self.layout.shard, L)

    def __call__(self, x, indices, weights, experts, plan: Optional[LayerPlan] = None):
        # x: [S, d]; indices: [S, k] global ids in [0, E), E = P * local experts;
        # a dropped slot (or a padding position's) carries id E and goes nowhere
        P, L = self.layout.parallel_size, experts.bins
        S, k = indices.shape
        device = x.device
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted by expert, so by rank
        sizes = self.last_sizes = self.sizes(flat, experts, plan)
        token_of = order[:sizes.kept] // k
        x_sorted = x.index_select(0, token_of)  # [kept, d], blocks by destination rank
        if self.exact:
            block_start = [sum(sizes.receive[:s]) for s in range(P)]
            received = _AllToAllSplit.apply(self.layout.group, x_sorted, sizes.receive, sizes.send)
        else:
            block_start = [s * sizes.capacity for s in range(P)]
            slot = self._padded_slots(sizes, device)
            buffer = x.new_zeros(P * sizes.capacity, x.size(1)).index_copy(0, slot, x_sorted)
            received = _AllToAll.apply(self.layout.group, buffer)  # [P * C, d], block s from s
        # received rows in expert-major order: for each local expert, each source
        starts = [block_start[s] + sum(sizes.recv[s][:e]) for e in range(L) for s in range(P)]
        lengths = [sizes.recv[s][e] for e in range(L) for s in range(P)]
        rows = _segment_rows(to_device(starts, device), to_device(lengths, device),
                             sum(lengths))  # [R]
        h = experts(received.index_select(0, rows), sizes.per_expert)  # [R, d]
        back = h.new_zeros(received.shape).index_copy(0, rows, h)
        if self.exact:
            h = _AllToAllSplit.apply(self.layout.group, back, sizes.send, sizes.receive)
        else:
            returned = _AllToAll.apply(self.layout.group, back)  # [P * C, d] in send layout
            h = returned.index_select(0, slot)  # [kept, d], this rank's sorted rows
        if weights is not None:
            h = h * weights.reshape(-1)[order[:sizes.kept]].unsqueeze(-1).to(h.dtype)
        return h.new_zeros(S, h.size(1)).index_add(0, token_of, h), S * k - sizes.kept

    @staticmethod
    def _padded_slots(sizes: ExchangeSizes, device) -> torch.Tensor:
        """``[kept]`` place of each sorted row in the padded send buffer ``[P * C]``."""
        send = to_device(sizes.send, device)
        P = len(sizes.send)
        dest = torch.repeat_interleave(torch.arange(P, device=device), send,
                                       output_size=sizes.kept)
        start = send.cumsum(0) - send
        return dest * sizes.capacity + torch.arange(sizes.kept, device=device) - start[dest]
