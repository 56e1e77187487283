"""MultiHash (``--hash-count N``): N hashes each choose one segment of the FFN.

    router = MultiHashRouter(hash_fn, table, K, fingerprint)   # table gives [B, T, N]
    experts = SegmentedExpertFFN(K, d, f, num_hashes=N)        # f divisible by N
    moe = MoELayer(router, experts)

The K experts are the K FFNs of the plain hash layer. fc1's f output units and
fc2's f input units are cut into N segments of f/N; hash m picks which
expert's copy of segment m a token uses. Seen by the dispatch, segment m of
expert e is a narrow expert of its own, with id ``e * N + m``: a token has N
slots, one per segment, and the MoE layer sums the slots' outputs, which is
fc2 applied to the concatenated segments. fc2's bias is added once (by the
segment-0 slot). Compute per token is one FFN's; parameters are K FFNs',
exactly those of ``--hash-count 1``, and a state dict has the same shapes.
"""
import torch
import torch.nn.functional as F

from .experts import ExpertFFN, grouped_linear
from .grouped_mm import ExpertRows
from .routers import HashRouter, RouterOutput


class MultiHashRouter(HashRouter):
    """N hash columns -> N slots a token, slot m on narrow expert ``e_m * N + m``."""

    def forward(self, x, route) -> RouterOutput:
        out = super().forward(x, route)  # indices: [S, N] experts in [0, K)
        n = out.indices.size(1)
        segment = torch.arange(n, device=out.indices.device)
        out.indices = out.indices * n + segment  # [S, N] narrow experts in [0, K*N)
        return out

    @property
    def num_hashes(self) -> int:
        return self.table.size(1) // self.hash_fn.columns_per_hash


class SegmentedExpertFFN(ExpertFFN):
    """K expert FFNs of width f seen as K*N narrow experts of width f/N.

    ``local_experts`` and ``total_experts`` count FFNs, as in ExpertFFN;
    ``bins`` (what the dispatch counts) is ``local_experts * N``. The
    parameters are the plain ``[K, f, d]`` / ``[K, d, f]`` stacks; segment m of
    expert e is rows ``m*f/N:(m+1)*f/N`` of fc1 and the same columns of fc2.
    """

    def __init__(self, total_experts, embed_dim, ffn_dim, num_hashes, **kwargs):
        if num_hashes < 1 or ffn_dim % num_hashes:
            raise ValueError(f"{num_hashes} segments do not split an FFN of width {ffn_dim}")
        super().__init__(total_experts, embed_dim, ffn_dim, **kwargs)
        self.num_hashes = num_hashes

    @property
    def bins(self) -> int:
        """The narrow experts of rows this module computes: N segments of each local expert."""
        return self.local_experts * self.num_hashes

    def segments(self):
        """The narrow experts' weights, views of the parameters (no copy).

        fc1's segment m is rows of fc1, so ``[K*N, f/N, d]`` is a view; fc2's
        is columns, so its segments stay ``[K, N, d, f/N]`` (a flat ``[K*N, d,
        f/N]`` would copy all of fc2 on every forward). fc2's bias ``[K, N,
        d]`` is zero but for segment 0, which adds it once a token.
        """
        n, (k, f, d) = self.num_hashes, self.fc1_weight.shape
        w1 = self.fc1_weight.view(k * n, f // n, d)
        b1 = self.fc1_bias.view(k * n, f // n)
        w2 = self.fc2_weight.view(k, d, n, f // n).transpose(1, 2)
        b2 = F.pad(self.fc2_bias.unsqueeze(1), (0, 0, 0, n - 1))
        return w1, b1, w2, b2

    def forward(self, x, counts):
        # x: [S, d] sorted by narrow expert; counts: K*N ints (or ExpertRows)
        counts = ExpertRows.of(counts)  # made once for fc1 and fc2
        w1, b1, w2, b2 = self.segments()
        h = grouped_linear(x, w1, b1, counts)  # [S, f/N]
        h = self.activation_dropout(self.activation_fn(h))
        return grouped_linear(h, w2, b2, counts)  # [S, d], one segment's share of fc2
