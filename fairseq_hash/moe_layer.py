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

With one expert per token and no slot dropped (every hash layer), dispatch and
combine are a permutation and its inverse, and so are their gradients: both
directions are row gathers (``index_select``), where autograd's own backward
of a gather would scatter-add into a zeroed ``[S, d]`` tensor.
"""
from typing import Optional

import torch
import torch.nn as nn

from .experts import ExpertFFN
from .hashing import RouteInputs
from .route import Route


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
            (expert_parallel.AllToAllExchange); None on one process
    """

    def __init__(self, router: nn.Module, experts: ExpertFFN, exchange=None):
        super().__init__()
        self.router = router
        self.experts = experts
        # expert parallelism: sends tokens to the ranks of their experts and back
        # (expert_parallel.AllToAllExchange); None on one process
        self.exchange = exchange
        self.parallel_size = getattr(getattr(exchange, "layout", None), "parallel_size", 1)
        self.route: Optional[Route] = None  # of the running forward pass, set by the model
        self.aux_loss = None  # of the last forward, read by the criterion
        self.last_indices = None  # of the last forward, read by routing reports
        self.num_dropped = 0

    @property
    def total_bins(self) -> int:
        """Expert ids the router's indices range over, all ranks' together (K, or K*N
        narrow experts under MultiHash); a dropped slot is sent to id ``total_bins``."""
        return self.experts.bins * self.parallel_size

    def forward(self, x: torch.Tensor, inputs: Optional[RouteInputs] = None) -> torch.Tensor:
        """``inputs``, where given, route this call; else ``self.route`` does."""
        route = Route(inputs) if inputs is not None else self.route or Route(None)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [S, d]
        out = self.router(x, route.inputs)
        indices = out.indices  # [S, k]
        if out.dropped is not None:
            # a dropped slot is computed nowhere: route it past the last expert
            indices = indices.masked_fill(out.dropped, self.total_bins)
        if self.exchange is not None:
            y, dropped = self.exchange(x, indices, out.weights, self.experts, route.plan)
        else:
            y, dropped = self.dispatch(x, indices, out.weights)
        self.aux_loss = out.aux_loss
        self.last_indices = out.indices.detach()
        self.num_dropped = dropped
        return y.view(shape)

    def dispatch(self, x, indices, weights):
        """On one process: sort (token, slot) pairs by expert, compute, combine."""
        S, k = indices.shape
        flat = indices.reshape(-1)  # [S*k]
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs in expert order
        counts = torch.bincount(flat, minlength=self.experts.bins + 1)
        counts = counts[: self.experts.bins].tolist()
        kept = sum(counts)
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
