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


@dataclass
class Route:
    """The route of one forward pass, as one MoE layer receives it."""

    inputs: Optional[RouteInputs]  # None for routers that look at hidden states only
    plan: Optional[LayerPlan] = None
