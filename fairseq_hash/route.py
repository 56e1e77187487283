"""What a MoE layer is told about one forward pass before its fairseq layer runs.

    route = Route(RouteInputs.from_tokens(tokens, pad, eos), plan)   # plan: a LayerPlan
    moe.route = route              # one declared attribute of MoELayer
    y = layer(x)                   # fairseq's layer calls moe(x); the router reads route.inputs

fairseq's layers call their FFN with the hidden states alone, so the token
context cannot travel as an argument: the model (``models/hash_layers.py``)
sets ``moe.route`` around each forward pass, and ``models/fairseq_surgery.py``
replays it into the layer's recomputation under ``--checkpoint-activations``.

``inputs`` are the token ids and their context (``hashing.RouteInputs``).
``plan`` holds what the model worked out for this layer from those token ids
before any layer ran (a hash layer's routing depends on them alone). It is
the place for anything else known ahead of the layer, such as host-side
split sizes of the exchange, or the experts a layer will need (to fetch them
ahead): a new field of :class:`LayerPlan`, not a new attribute of the layer.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from .hashing import RouteInputs


@dataclass
class LayerPlan:
    """One MoE layer's routing, known before it runs (a hash layer's, from the token
    ids: ``moe_layer.plan_hash_dispatch``), so the layer reads nothing from the device."""

    indices: Optional[torch.Tensor] = None  # [S, k] expert ids; padding positions carry E
    counts: Optional[List[int]] = None  # [E] this rank's (token, slot) pairs of each expert
    device_counts: Optional[torch.Tensor] = None  # [E] the same, on the device
    # [P][E] each rank of the expert group's counts (expert parallelism: the exchange's
    # sizes, gathered for all hash layers in one collective)
    everyone: Optional[List[List[int]]] = None
    padding: int = 0  # slots of padding positions (routed nowhere)
    # the experts the layer will use, in the order it uses them (--hash-offload-experts
    # prefetch: announced to the expert cache before the first layer runs)
    experts: Optional[List[int]] = None


@dataclass
class Route:
    """The route of one forward pass, as one MoE layer receives it."""

    inputs: Optional[RouteInputs]  # None for routers that look at hidden states only
    plan: Optional[LayerPlan] = None


def expert_counts(indices: torch.Tensor, width: int) -> torch.Tensor:
    """``[width]`` int64: how many entries of ``indices`` (ints in ``[0, width)``) hold each value.

    A histogram by ``scatter_add_`` into a tensor of known size, which a GPU computes
    without waiting: ``torch.bincount`` sizes its output by the largest index, which it
    reads from the device (its CUDA kernel takes the input's min and max with ``.item()``;
    ``benchmarks/gpu_check.sh`` step 5 counted two waits a call).
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(width, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))
