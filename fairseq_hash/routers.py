"""Routers: which experts each token goes to, and with what weight.

A router maps ``[S, d]`` hidden states (and the token context of those S
positions) to a :class:`RouterOutput`; it knows nothing of dispatch. The MoE
layer sorts tokens by ``indices``, runs the experts and combines the k outputs
of each token, weighted by ``weights`` where a router gives them.

    router = HashRouter(hash_fn, table)                 # no parameters
    out = router(x, route_inputs)                       # x: [S, d]
    out.indices  # [S, k] expert ids; out.weights: [S, k] or None; out.aux_loss
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .errors import HashConfigError
from .hashing import HashFunction, RouteInputs


@dataclass
class RouterOutput:
    indices: torch.Tensor  # [S, k] long, expert of each of a token's k slots
    weights: Optional[torch.Tensor] = None  # [S, k] scale of each slot's output
    aux_loss: Optional[torch.Tensor] = None  # scalar, added to the training loss
    dropped: Optional[torch.Tensor] = None  # [S, k] bool, slots over capacity


class HashRouter(nn.Module):
    """Hash Layers' router: a fixed table lookup on the token context.

    The table (``[R, N]`` expert ids) is a buffer, so it travels in every
    checkpoint, together with a fingerprint of the dictionary it was built
    for; loading it beside another dictionary is refused.
    """

    def __init__(self, hash_fn: HashFunction, table: torch.Tensor, num_experts: int,
                 dict_fingerprint: int):
        super().__init__()
        self.hash_fn = hash_fn
        self.num_experts = num_experts
        self.register_buffer("table", table.long())
        self.register_buffer("dict_fingerprint", torch.tensor([dict_fingerprint]))

    def forward(self, x: torch.Tensor, route: RouteInputs) -> RouterOutput:
        experts = self.hash_fn.route(self.table, route)  # [B, T, N]
        # fairseq's layers see time-major [T, B, d] features, flattened to [T*B, d]
        indices = experts.transpose(0, 1).reshape(-1, experts.size(-1))
        return RouterOutput(indices=indices)

    def upgrade_state_dict_named(self, state_dict, name):
        """Refuse a checkpoint whose table was built for another dictionary or K."""
        prefix = f"{name}." if name else ""
        table = state_dict.get(prefix + "table")
        fingerprint = state_dict.get(prefix + "dict_fingerprint")
        if table is None:
            return
        if table.shape != self.table.shape or (
            fingerprint is not None and int(fingerprint[0]) != int(self.dict_fingerprint[0])
        ):
            raise HashConfigError(
                f"the hash table {prefix}table in the checkpoint ({tuple(table.shape)} rows x "
                f"hashes) was built for another dictionary than the one loaded now "
                f"({tuple(self.table.shape)}); load the checkpoint with the dict.txt it was "
                f"trained with"
            )
        if int(table.max()) >= self.num_experts:
            raise HashConfigError(
                f"the hash table {prefix}table routes to expert {int(table.max())} but "
                f"--hash-experts is {self.num_experts}"
            )
