"""Dispatch: sort tokens by expert, run each expert on its slice, unsort.

    moe = MoELayer(router, ExpertFFN(K, d, f))
    y = moe(x, RouteInputs.from_tokens(tokens, pad, eos))   # x: [..., d] -> y: [..., d]

Inside a model, fairseq's layer calls ``moe(x)`` and the token context comes
from ``moe.route`` (a :class:`~fairseq_hash.route.Route`), which the model
sets around each forward pass.

Dropless and index-based: one stable sort of the S*k (token, slot) pairs by
expert id, one gather into expert order, one grouped FFN over contiguous
slices, one scatter-add back into token order. No ``[S, K]`` one-hot mask, no
capacity, no token dropped (a router may still mark slots ``dropped``; those
contribute nothing, as in Switch Transformers' capacity overflow).

With one expert per token and no slot dropped (a hash layer without
padding), dispatch and combine are a permutation and its inverse, and so are
their gradients: both directions are row gathers (``index_select``), where
autograd's own backward of a gather would scatter-add into a zeroed ``[S, d]``
tensor.

A hash layer's routing depends on the token ids alone, so its dispatch is
planned before the layers run (:func:`plan_hash_dispatch`, a ``LayerPlan``
in the route): the per-expert counts of every hash layer, of every rank of an
expert group where experts are spread, reach the host in one read per forward
pass, and the layers, their backward and a ``--checkpoint-activations``
recomputation read nothing from the device. Padding positions go to no expert
(their output is zero; fairseq masks them out of attention and the loss).
Learned routers choose from the hidden state, so their layer reads its counts
itself, once.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from .experts import ExpertFFN
from .grouped_mm import ExpertRows
from .hashing import RouteInputs
from .route import LayerPlan, Route, expert_counts
from .routers import HashRouter


def plan_hash_dispatch(moes: List["MoELayer"], inputs: RouteInputs) -> List[LayerPlan]:
    """Plans of hash layers that share a layout, with one read from the device.

    Each layer's counts come from its table lookup on the device; where experts
    are spread over ranks, one all-gather exchanges every layer's counts at
    once, and a single ``tolist`` brings them all to the host.
    """
    indices = [moe.hash_indices(inputs) for moe in moes]  # [S, k] each
    width = max(moe.total_bins for moe in moes) + 1  # the last bucket: padding
    counts = torch.stack([expert_counts(i, width) for i in indices])
    layout = next((moe.exchange.layout for moe in moes if moe.exchange is not None), None)
    if layout is not None:
        from .expert_parallel import gather_counts

        everyone = gather_counts(counts, layout)  # [P, layers, E + 1]
    else:
        everyone = counts.unsqueeze(0)
    host = everyone.tolist()  # the forward pass's one read from the device
    me = layout.shard if layout is not None else 0
    plans = []
    for n, (moe, idx) in enumerate(zip(moes, indices)):
        E = moe.total_bins
        plans.append(LayerPlan(
            indices=idx, counts=host[me][n][:E], device_counts=counts[n, :E],
            everyone=[rank[n][:E] for rank in host] if layout is not None else None,
            padding=host[me][n][E]))
    return plans


class Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class MoELayer(nn.Module):
    """Route, dispatch, compute, combine.

    Args:
        router (nn.Module): maps ``([S, d], RouteInputs)`` to a RouterOutput
        experts (ExpertFFN): the K expert FFNs
        exchange: sends tokens to the ranks of their experts and back
            (expert_parallel.exchange.AllToAllExchange); None on one process
    """

    def __init__(self, router: nn.Module, experts: ExpertFFN, exchange=None):
        super().__init__()
        self.router = router
        self.experts = experts
        # expert parallelism: sends tokens to the ranks of their experts and back
        # (expert_parallel.exchange.AllToAllExchange); None on one process
        self.exchange = exchange
        self.parallel_size = getattr(getattr(exchange, "layout", None), "parallel_size", 1)
        self.route: Optional[Route] = None  # of the running forward pass, set by the model
        # expert_parallel.layout.ExpertLayout on several ranks (set by moe_factory)
        self.layout = None
        self.aux_loss = None  # of the last forward, read by the criterion
        self.last_indices = None  # of the last forward, read by routing reports
        self.num_dropped = 0

    @property
    def total_bins(self) -> int:
        """Expert ids the router's indices range over, all ranks' together (K, or K*N
        narrow experts under MultiHash); a dropped slot is sent to id ``total_bins``."""
        return self.experts.bins * self.parallel_size

    @property
    def plans_ahead(self) -> bool:
        """Whether the router's choice depends on the token ids alone (a hash)."""
        return isinstance(self.router, HashRouter)

    def hash_indices(self, inputs: RouteInputs) -> torch.Tensor:
        """``[S, k]`` experts of a hash router, padding positions past the last expert."""
        indices = self.router(None, inputs).indices
        pad = inputs.pad.transpose(0, 1).reshape(-1, 1)  # fairseq's [T, B] order
        return indices.masked_fill(pad, self.total_bins)

    def forward(self, x: torch.Tensor, inputs: Optional[RouteInputs] = None) -> torch.Tensor:
        """``inputs``, where given, route this call; else ``self.route`` does."""
        route = Route(inputs) if inputs is not None else self.route or Route(None)
        plan = route.plan
        if plan is None and self.plans_ahead and route.inputs is not None:
            plan = plan_hash_dispatch([self], route.inputs)[0]  # a layer used on its own
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [S, d]
        out = self.router(x, route.inputs)
        indices = out.indices  # [S, k]
        if plan is not None:
            indices = plan.indices
        elif out.dropped is not None:
            # a dropped slot is computed nowhere: route it past the last expert
            indices = indices.masked_fill(out.dropped, self.total_bins)
        if self.exchange is not None:
            y, dropped = self.exchange(x, indices, out.weights, self.experts, plan)
        else:
            y, dropped = self.dispatch(x, indices, out.weights, plan)
        self.aux_loss = out.aux_loss
        self.last_indices = out.indices.detach()
        self.num_dropped = dropped - (plan.padding if plan is not None else 0)
        return y.view(shape)

    def dispatch(self, x, indices, weights, plan: Optional[LayerPlan] = None):
        """On one process: sort (token, slot) pairs by expert, compute, combine."""
        S, k = indices.shape
        E = self.experts.bins
        flat = indices.reshape(-1)  # [S*k]
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs in expert order
        if plan is not None:
            counts = ExpertRows(plan.counts, plan.device_counts)
        else:  # a learned router: its one read
            device_counts = expert_counts(flat, E + 1)[:E]
            counts = ExpertRows(device_counts.tolist(), device_counts)
        kept = counts.total
        if k == 1 and kept == S:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(S, device=order.device)
            h = self.experts(Permute.apply(x, order, inverse), counts)  # [S, d] by expert
            if weights is not None:
                h = h * weights.reshape(-1)[order].unsqueeze(-1).to(h.dtype)
            return Permute.apply(h, inverse, order), 0  # back to token order
        token_of = order[:kept] // k if k > 1 else order[:kept]
        h = self.experts(x.index_select(0, token_of), counts)  # [S*k kept, d]
        if weights is not None:
            h = h * weights.reshape(-1)[order[:kept]].unsqueeze(-1).to(h.dtype)
        return h.new_zeros(S, x.size(1)).index_add_(0, token_of, h), S * k - kept
