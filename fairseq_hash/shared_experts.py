"""Shared experts (``--hash-shared-experts N``): dense FFNs every token passes through.

    shared = SharedExperts(num_shared=1, embed_dim=512, ffn_dim=1024)
    moe = SharedExpertMoELayer(router, experts, shared)
    y = moe(x, inputs)   # routed experts' combined output + shared(x)

As in DeepSeek's MoE layers, the N shared experts are computed as one dense
FFN of width N * f: N FFNs of width f whose outputs are summed are exactly
that FFN, its hidden units being theirs side by side (with one fc2 bias, the
sum of theirs). Their weights are shared parameters (no ``expert`` flag):
every worker holds and all-reduces them, and nothing is dispatched (with
expert parallelism each rank computes them on its own tokens).
"""
import torch
import torch.nn as nn

from .moe_layer import MoELayer


class SharedExperts(nn.Module):
    """``fc2(act(fc1(x)))`` of width ``num_shared * ffn_dim``.

    Args:
        num_shared (int): N, the number of shared experts
        embed_dim (int): d
        ffn_dim (int): hidden width of each shared expert
    """

    def __init__(self, num_shared: int, embed_dim: int, ffn_dim: int):
        super().__init__()
        if num_shared < 1 or ffn_dim < 1:
            raise ValueError(f"{num_shared} shared experts of width {ffn_dim}: both must be "
                             f"at least 1")
        self.num_shared = num_shared
        self.fc1 = nn.Linear(embed_dim, num_shared * ffn_dim)
        self.fc2 = nn.Linear(num_shared * ffn_dim, embed_dim)

    def forward(self, x, activation_fn, activation_dropout):
        # x: [..., d] -> [..., N * f] -> [..., d]
        return self.fc2(activation_dropout(activation_fn(self.fc1(x))))


class SharedExpertMoELayer(MoELayer):
    """A MoE layer whose output also holds the shared experts' output.

    The shared experts use the routed experts' activation and activation
    dropout (those of the fairseq layer they replace).
    """

    def __init__(self, router: nn.Module, experts: nn.Module, shared: SharedExperts,
                 exchange=None):
        super().__init__(router, experts, exchange)
        self.shared = shared

    def forward(self, x: torch.Tensor, inputs=None) -> torch.Tensor:
        routed = super().forward(x, inputs)
        return routed + self.shared(x, self.experts.activation_fn, self.experts.activation_dropout)
