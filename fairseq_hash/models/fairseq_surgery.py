"""Make one of fairseq's Transformer layers compute its FFN sublayer with a MoE layer.

    moe = build_hash_moe(spec, dictionary, layer_idx, embed_dim, ffn_dim)
    replace_ffn(layer, moe)           # fc1 -> moe; activation, dropout, fc2 -> identities
    pass_route_through(layer, moe)    # moe.route reaches the layer's (re)computation

Everything here works around one fairseq behaviour each, and says which.
"""
import functools
from typing import Callable

import torch.nn as nn
from fairseq.modules.checkpoint_activations import _checkpointed_forward

from ..errors import HashConfigError
from ..moe_layer import MoELayer


def _identity(x):
    return x


def replace_ffn(layer: nn.Module, moe: MoELayer):
    """Make a fairseq Transformer layer compute its FFN sublayer with ``moe``.

    fairseq's layer forward computes ``fc2(dropout(act(fc1(x))))`` inline,
    between its own layer norm, dropout and residual. The routed FFN takes the
    place of fc1 and the three steps after it become identities, so everything
    around the FFN stays fairseq's own code.
    """
    if getattr(layer, "ffn_layernorm", None) is not None:
        raise HashConfigError("--scale-fc is not supported on hash layers")
    moe.experts.activation_fn = layer.activation_fn
    moe.experts.activation_dropout = layer.activation_dropout_module
    layer.fc1 = moe
    layer.activation_fn = _identity
    layer.activation_dropout_module = nn.Identity()
    layer.fc2 = nn.Identity()


def around_own_forward(layer: nn.Module, wrap: Callable[[Callable], Callable]) -> Callable:
    """``layer.forward`` with ``wrap(own)`` in the place of the layer's own forward ``own``.

    fairseq's ``checkpoint_wrapper`` (``--checkpoint-activations``) leaves
    ``layer.precheckpoint_forward = own`` and ``layer.forward =
    functools.partial(_checkpointed_forward, own, offload_to_cpu)``; the result
    keeps that wrapper around ``wrap(own)``, so the backward's recomputation
    runs ``wrap(own)`` on the arguments of the forward. A layer without the
    wrapper gets ``wrap(layer.forward)``. Any other layout of the wrapper is
    refused, rather than routing a recomputation by another batch's tokens.
    """
    own = getattr(layer, "precheckpoint_forward", None)
    if own is None:
        return wrap(layer.forward)
    checkpointed = layer.forward
    if not (isinstance(checkpointed, functools.partial)
            and checkpointed.func is _checkpointed_forward and checkpointed.args[:1] == (own,)):
        raise RuntimeError(
            "fairseq's checkpoint_wrapper is not partial(_checkpointed_forward, "
            "precheckpoint_forward, offload_to_cpu) in this fairseq version: hash layers cannot "
            "pass their routing through --checkpoint-activations; train without it")
    return functools.partial(_checkpointed_forward, wrap(own), *checkpointed.args[1:],
                             **checkpointed.keywords)


def pass_route_through(layer: nn.Module, moe: MoELayer):
    """Hand ``moe.route`` to the layer's computation as a call argument.

    The model sets ``moe.route`` before its layers run; fairseq calls the layer
    with the hidden states alone. The layer's forward reads the route when
    it is called and passes it on as an argument, and ``moe.route`` holds it
    while the layer's own forward runs. Under ``--checkpoint-activations``
    fairseq's wrapper re-runs the layer in the backward pass, after the model
    has moved on: it replays the arguments it was given, so the recomputation
    routes as the forward did, even when several forwards run before one
    backward.
    """
    def wrap(own):
        def routed(*args, _hash_route=None, **kwargs):
            outer, moe.route = moe.route, _hash_route
            try:
                return own(*args, **kwargs)
            finally:
                moe.route = outer
        return routed

    call = around_own_forward(layer, wrap)

    def forward(*args, **kwargs):
        return call(*args, _hash_route=moe.route, **kwargs)

    layer.forward = forward
