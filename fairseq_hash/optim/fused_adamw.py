"""``--optimizer fused_adamw``: fairseq's ``adam`` update in one pass per parameter.

A hash layer multiplies the parameters of one FFN by K, and Adam reads and
writes every parameter at every update, whether its expert saw many tokens or
few. Off CUDA, fairseq's ``adam`` (``fairseq.optim.adam.Adam``) updates a
parameter with eight tensor operations and one temporary of its size, each a
pass over memory; torch's fused AdamW kernel makes one pass (BENCHMARKS.md
measures both).

The update is fairseq's: AdamW's decoupled weight decay (``--weight-decay``),
``--adam-betas`` and ``--adam-eps`` with fairseq's placement of eps, which it
adds to ``sqrt(v)`` before the bias correction where torch adds it after; the
step rescales eps so that both are the same formula. Parameters match
fairseq's ``adam`` to float rounding (``tests/test_fused_adamw.py``).
Checkpoints keep torch's optimizer state; resuming a run that used another
optimizer needs fairseq's ``--reset-optimizer``, as always.
"""
import math
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam
from omegaconf import II


@dataclass
class FusedAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(
        default=(0.9, 0.999), metadata={"help": "betas for Adam, as for --optimizer adam (default (0.9, 0.999))"}
    )
    adam_eps: float = field(
        default=1e-8, metadata={"help": "epsilon for Adam, placed as --optimizer adam places it (default 1e-8)"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "decoupled (AdamW) weight decay, as for --optimizer adam (default 0)"}
    )
    lr: List[float] = II("optimization.lr")


class FairseqEpsAdamW(torch.optim.AdamW):
    """torch's AdamW computing fairseq's Adam update.

    fairseq: ``p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)``; torch:
    ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps')``, with ``bc_i = 1 -
    beta_i ** t``. They agree for ``eps' = eps / sqrt(bc2)``, set around each step.
    """

    def __init__(self, params, **kwargs):
        params = list(params)
        tensors = [p for group in params for p in
                   (group["params"] if isinstance(group, dict) else [group])]
        if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors):
            kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)

    def _next_step(self, group) -> int:
        for p in group["params"]:
            if p.grad is not None:
                state = self.state.get(p, {})
                return int(state["step"]) + 1 if "step" in state else 1
        return 1

    @torch.no_grad()
    def step(self, closure=None):
        eps = [group["eps"] for group in self.param_groups]
        for group in self.param_groups:
            bias_correction2 = 1 - group["betas"][1] ** self._next_step(group)
            group["eps"] = group["eps"] / math.sqrt(bias_correction2)
        try:
            return super().step(closure)
        finally:  # the groups (and checkpoints) keep the user's eps
            for group, value in zip(self.param_groups, eps):
                group["eps"] = value


@register_optimizer("fused_adamw", dataclass=FusedAdamWConfig)
class FusedAdamW(FairseqOptimizer):
    """fairseq's ``adam``, computed by torch's fused AdamW kernel (CPU and CUDA)."""

    def __init__(self, cfg: FusedAdamWConfig, params):
        super().__init__(cfg)
        self._optimizer = FairseqEpsAdamW(params, **self.optimizer_config)

    # the same lr/betas/eps/weight_decay reading as fairseq's adam
    optimizer_config = FairseqAdam.optimizer_config
