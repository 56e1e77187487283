"""``--moe-dispatch fairscale``: fairscale's own ``MOELayer``, driven by the router's choice.

    exchange = FairscaleExchange(layout, experts)
    y, dropped = exchange(x, indices, weights, experts)

fairscale's ``MOELayer`` (GShard's algorithm) asks its gate for dense
``[S, E, C]`` dispatch and combine tensors, moves ``einsum``-dispatched
``[E, C, d]`` blocks through its all-to-all, and runs each local expert on
its ``[P, C, d]`` rows. Here the "gate" is the router's decision already made
(a hash, or a learned router), and the capacity C is the largest count any
rank sends any expert in this step (one all-reduce), so nothing is dropped.
It is offered to compare against the default index-based exchange
(:class:`~fairseq_hash.expert_parallel.exchange.AllToAllExchange`); the outputs and
gradients are equal, and the dense masks cost memory and time that grow with
E and C (BENCHMARKS.md).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from fairscale.nn.moe import MOELayer

from .route import expert_counts


class DecidedGate(nn.Module):
    """fairscale's gate contract, ``x -> (l_aux, combine [S,E,C], dispatch [S,E,C])``,
    for routing decided beforehand (``decide`` is called before each forward)."""

    def __init__(self, total_bins: int, group):
        super().__init__()
        self.total_bins, self.group = total_bins, group
        self.indices = self.weights = None

    def decide(self, indices, weights, capacity=None):
        # [S', k]; ``capacity``: a hash layer's, from its plan (else one all-reduce)
        self.indices, self.weights, self.capacity = indices, weights, capacity

    def forward(self, x):
        indices, (S, k), E = self.indices, self.indices.shape, self.total_bins
        flat = indices.reshape(-1)  # [S*k]; dropped slots carry E
        counts = expert_counts(flat, E + 1)[:E]  # no wait for the device (route.py)
        capacity = self.capacity
        if capacity is None:
            capacity = counts.max().clone()
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.group)  # equal splits
            capacity = int(capacity)
        capacity = max(capacity, 1)
        # rank of each slot among the slots of its expert, in token order
        order = torch.argsort(flat, stable=True)
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - (
            counts.cumsum(0) - counts)[flat[order].clamp(max=E - 1)]
        # a dropped slot writes 0 at a place of its own token (no boolean mask: no sync)
        kept = (flat < E).to(x.dtype)
        where = (torch.arange(S, device=flat.device).repeat_interleave(k),
                 flat.clamp(max=E - 1), rank.clamp(0, capacity - 1))
        dispatch = torch.zeros(S, E, capacity, dtype=x.dtype, device=x.device)
        dispatch.index_put_(where, kept, accumulate=True)
        weight = (self.weights.reshape(-1).to(x.dtype) if self.weights is not None
                  else torch.ones(S * k, dtype=x.dtype, device=x.device))
        combine = torch.zeros_like(dispatch).index_put_(where, weight * kept, accumulate=True)
        return x.new_zeros(()), combine, dispatch.bool()


class LocalExpert(nn.Module):
    """Local expert ``slot`` of an ExpertFFN, as fairscale's MOELayer calls experts:
    ``[P, 1, C, d] -> [P, 1, C, d]``. The FFN is held outside the module tree, so
    its parameters appear once in the state dict (under the MoE layer)."""

    def __init__(self, experts, slot: int):
        super().__init__()
        self.__dict__["ffn"] = experts
        self.slot = slot

    def forward(self, chunk):
        rows = chunk.reshape(-1, chunk.size(-1)).to(self.ffn.fc1_weight.dtype)
        counts = [0] * self.ffn.bins
        counts[self.slot] = rows.size(0)
        return self.ffn(rows, counts).to(chunk.dtype).view(chunk.shape)


class FairscaleExchange:
    def __init__(self, layout, experts):
        self.layout = layout  # read by the MoE layer, the decoder's plan and checkpoints
        E = layout.parallel_size * experts.bins
        self.gate = DecidedGate(E, layout.group)
        self.moe = MOELayer(self.gate, nn.ModuleList(
            [LocalExpert(experts, slot) for slot in range(experts.bins)]), layout.group)

    def __call__(self, x, indices, weights, experts, plan=None):
        S, L = x.size(0), experts.bins
        pad = (-S) % L  # MOELayer asks for a multiple of the local experts
        if pad:  # padding rows are dispatched nowhere
            x = torch.cat([x, x.new_zeros(pad, x.size(1))])
            indices = torch.cat([indices, indices.new_full((pad, indices.size(1)),
                                                           self.gate.total_bins)])
            if weights is not None:
                weights = torch.cat([weights, weights.new_zeros(pad, weights.size(1))])
        capacity = max(max(row) for row in plan.everyone) if plan is not None else None
        self.gate.decide(indices, weights, capacity)
        # fairscale's MOELayer casts its dispatch mask to float32 (``dispatch_mask.float()``
        # in its einsum), which refuses fp16/bf16 inputs: it runs in float32, and each
        # expert in its weights' dtype (LocalExpert)
        y = self.moe(x.float().unsqueeze(1)).squeeze(1).to(x.dtype)  # [S', 1, d]: 3 dims
        if plan is not None:  # a hash layer drops nothing but its padding
            return y[:S], plan.padding
        return y[:S], int((indices[:S] >= self.gate.total_bins).sum())
