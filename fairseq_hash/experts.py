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
"""
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bounds(counts: List[int]):
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


class GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]`` for every expert e."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        # x: [S, in], weight: [K, out, in], bias: [K, out] -> y: [S, out]
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        y = x.new_empty(x.size(0), weight.size(1))
        for e, lo, hi in _bounds(counts):
            torch.addmm(bias[e], x[lo:hi], weight[e].t(), out=y[lo:hi])
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
        if ctx.needs_input_grad[1]:
            # experts that received no token get an exact zero gradient
            grad_w = torch.zeros_like(weight)
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.size(0), weight.size(1))
        for e, lo, hi in _bounds(ctx.counts):
            g = grad_y[lo:hi]
            if grad_x is not None:
                torch.mm(g, weight[e], out=grad_x[lo:hi])
            if grad_w is not None:
                torch.mm(g.t(), x[lo:hi], out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
        if grad_x is not None and len(ctx.counts) and sum(ctx.counts) < x.size(0):
            grad_x[sum(ctx.counts):] = 0
        return grad_x, grad_w, grad_b, None


def grouped_linear(x, weight, bias, counts: List[int]):
    return GroupedLinear.apply(x, weight, bias, counts)


class ExpertFFN(nn.Module):
    """K position-wise FFNs ``fc2(dropout(act(fc1(x))))`` stored stacked.

    Args:
        num_experts (int): K, the number of experts held by this module
        embed_dim (int): d, the model width
        ffn_dim (int): f, the hidden width of every expert (the dense FFN's)
        activation_fn (callable): the activation between fc1 and fc2
        activation_dropout (nn.Module): dropout on the activations
    """

    def __init__(self, num_experts, embed_dim, ffn_dim, activation_fn=F.relu,
                 activation_dropout=None):
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.activation_fn = activation_fn
        self.activation_dropout = activation_dropout or nn.Identity()
        for p in self.parameters():
            # so fairseq's data-parallel wrappers know not to sync their gradients
            p.expert = True
        self.reset_parameters()

    def reset_parameters(self):
        # each expert starts like a fresh nn.Linear, as fairseq's dense FFN does
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.size(-1))
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(weight.data[e], a=math.sqrt(5))
            nn.init.uniform_(bias, -bound, bound)

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear, expert=None):
        """Copy a dense FFN's weights into one expert (or all of them)."""
        experts = range(self.num_experts) if expert is None else [expert]
        for e in experts:
            self.fc1_weight[e].copy_(fc1.weight)
            self.fc1_bias[e].copy_(fc1.bias)
            self.fc2_weight[e].copy_(fc2.weight)
            self.fc2_bias[e].copy_(fc2.bias)

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        # x: [S, d] sorted by expert; counts[e] rows for expert e
        h = grouped_linear(x, self.fc1_weight, self.fc1_bias, counts)  # [S, f]
        h = self.activation_dropout(self.activation_fn(h))
        return grouped_linear(h, self.fc2_weight, self.fc2_bias, counts)  # [S, d]
