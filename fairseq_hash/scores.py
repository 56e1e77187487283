"""Learned combination scores for top-k hash routing (``--hash-score``).

    gate = HashScoreGate(embed_dim=512, total_experts=16, score="softmax", scale=1.0)
    weights = gate(x, indices)   # x: [S, d], indices: [S, k] hashed experts -> [S, k]

The hash still chooses the experts; the gate only weighs their outputs, as in
DeepSeek-V4's hash-routed layers. It is a linear map d -> K (no bias) whose
rows are gathered at a token's k hashed experts, so the logits ``[S, k]`` are
computed for those experts only, never for all K. Scores:

    none           1/k for every slot (the paper: plain output for k = 1, mean for k > 1)
    softmax        softmax of the k logits
    sigmoid        sigmoid of each logit, divided by their sum over the k
    sqrt-softplus  sqrt(softplus(logit)), divided by their sum over the k

then multiplied by ``scale`` (``--hash-score-scale``). With k = 1 nothing is
normalised (one normalised score is the constant 1, from which the gate would
learn nothing): the output is scaled by ``scale * score(logit)``; softmax,
always 1 there, is refused. The gate's weights are shared parameters (not
``expert``), start at zero so that a new layer starts as the mean of its k
experts, and the scores are computed in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    # k = 1 stays as it is: one normalised score is the constant 1
    return scores / scores.sum(dim=-1, keepdim=True) if scores.size(1) > 1 else scores


# --hash-score -> the weights [S, k] of logits [S, k], before the scale
WEIGHTS = {
    "softmax": lambda logits: torch.softmax(logits, dim=-1),
    "sigmoid": lambda logits: _normalised(torch.sigmoid(logits)),
    "sqrt-softplus": lambda logits: _normalised(F.softplus(logits).sqrt()),
}
SCORES = ("none", *WEIGHTS)  # spec.HashLayerSpec.validate refuses any other --hash-score


class HashScoreGate(nn.Module):
    """Weights ``[S, k]`` of a token's k hashed experts from its hidden state.

    Args:
        embed_dim (int): d
        total_experts (int): K
        score (str): a key of ``WEIGHTS`` (checked with the other flags by spec.HashLayerSpec)
        scale (float): multiplies every weight
    """

    def __init__(self, embed_dim: int, total_experts: int, score: str, scale: float = 1.0):
        super().__init__()
        self.score = score
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros(total_experts, embed_dim))  # [K, d]

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.weight)  # [S, k, d]: the k hashed experts' rows only
        logits = torch.einsum("sd,skd->sk", x, rows.to(x.dtype)).float()  # [S, k]
        return WEIGHTS[self.score](logits) * self.scale

    def extra_repr(self):
        return f"score={self.score}, scale={self.scale}, experts={self.weight.size(0)}"
