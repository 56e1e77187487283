"""fairseq's TransformerDecoder with chosen FFN sublayers turned into hash layers.

    decoder = HashTransformerDecoder(args, dictionary, embed_tokens)
    # or, around a decoder fairseq has already built:
    decoder = HashTransformerDecoder.adopt(decoder, args, dictionary)

fairseq's decoder layers never see token ids. This decoder computes the
routing context (token, previous token, position; see ``hashing.RouteInputs``)
from ``prev_output_tokens`` before fairseq's own ``extract_features`` runs, and
hands it to its MoE layers. In incremental decoding fairseq still passes the
whole prefix, so the previous token and the position of the last step come
from the prefix itself and routing equals a full forward pass.
"""
import functools
import logging
import os
from typing import List

import torch
import torch.nn as nn
from fairseq.models.transformer import TransformerDecoder
from omegaconf import OmegaConf

from ..errors import HashConfigError
from ..experts import ExpertFFN
from ..expert_parallel import (AllToAllExchange, check_ddp_backend, expert_layout,
                               gather_counts, sync_expert_gradients)
from ..fairscale_dispatch import FairscaleExchange
from ..hashing import (RouteInputs, build_hash_function, dictionary_fingerprint,
                       expected_load, token_counts)
from ..moe_layer import MoELayer
from ..multihash import MultiHashRouter, SegmentedExpertFFN, check_hash_count
from ..routers import ROUTERS, HashRouter, build_learned_router
from ..scores import HashScoreGate, check_score
from ..shared_experts import SharedExpertMoELayer, SharedExperts
from ..table_file import load_table_file

logger = logging.getLogger(__name__)


def parse_hash_layers(spec: str, num_layers: int) -> List[int]:
    """``"0,-1"`` -> sorted 0-based layer indices; negative ones count from the end."""
    try:
        raw = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise HashConfigError(
            f"--hash-layer {spec!r}: expected comma-separated integers such as 0,-1"
        ) from None
    if not raw:
        raise HashConfigError(
            f"--hash-layer {spec!r} names no layer; give comma-separated decoder layer "
            f"indices such as 0,-1 (without hash layers, use --arch transformer_lm)"
        )
    layers = set()
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise HashConfigError(
                f"--hash-layer {i} is outside the model: with --decoder-layers "
                f"{num_layers} valid indices are {-num_layers}..{num_layers - 1}"
            )
        layers.add(i % num_layers)
    return sorted(layers)


def check_hash_args(args):
    if args.hash_experts < 2:
        raise HashConfigError(f"--hash-experts {args.hash_experts}: must be at least 2")
    build_hash_function(args.hash_type)  # raises for an unknown --hash-type
    router = getattr(args, "router", "hash")
    if router not in ROUTERS:
        raise HashConfigError(f"--router {router!r} is unknown; valid: {', '.join(ROUTERS)}")
    if router == "switch" and not getattr(args, "capacity_factor", 1.25) > 0:
        raise HashConfigError(f"--capacity-factor {args.capacity_factor}: must be positive")
    check_topk_args(args)


def check_topk_args(args):
    topk, count = getattr(args, "hash_topk", 1), getattr(args, "hash_count", 1)
    score = getattr(args, "hash_score", "none")
    if not 1 <= topk <= args.hash_experts:
        raise HashConfigError(f"--hash-topk {topk}: must lie in [1, --hash-experts "
                              f"{args.hash_experts}]")
    if topk > 1 and count > 1:
        raise HashConfigError(f"--hash-topk {topk} with --hash-count {count}: MultiHash already "
                              f"sends a token to {count} expert segments; use one of the two")
    check_score(score, topk, getattr(args, "hash_score_scale", 1.0))
    if getattr(args, "router", "hash") != "hash" and (topk > 1 or score != "none"):
        raise HashConfigError("--hash-topk and --hash-score need --router hash (learned routers "
                              "choose and weigh their experts themselves)")
    if getattr(args, "hash_shared_experts", 0) < 0:
        raise HashConfigError(f"--hash-shared-experts {args.hash_shared_experts}: must be 0 or more")


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


def build_hash_router(args, dictionary, layer_idx: int, count: int, gate=None) -> HashRouter:
    hash_fn = build_hash_function(args.hash_type, args.hash_experts)
    router_cls = HashRouter if count == 1 else MultiHashRouter
    topk = getattr(args, "hash_topk", 1)
    extra = dict(topk=topk, gate=gate) if count == 1 else {}
    fingerprint = dictionary_fingerprint(dictionary)
    hash_file = getattr(args, "hash_file", None)
    if hash_file and not os.path.exists(hash_file):
        # fairseq rebuilds a model from its saved flags before loading its
        # weights, and the table is among them: a moved file is not needed then
        return router_cls.awaiting_checkpoint(hash_fn, args.hash_experts, fingerprint,
                                              hash_file, max(count, topk), **extra)
    seed = args.hash_seed + layer_idx
    if hash_file:
        # one table from the file serves every hash layer
        table = load_table_file(hash_file, dictionary, args.hash_type, args.hash_experts, count,
                                topk)
    elif topk > 1:
        table = hash_fn.build_topk_table(dictionary, args.hash_experts, topk, seed)
    else:
        table = hash_fn.build_table(dictionary, args.hash_experts, num_hashes=count, seed=seed)
    return router_cls(hash_fn, table, args.hash_experts, fingerprint, **extra)


def ddp_backend_of(args):
    """fairseq's --ddp-backend, wherever this kind of model config keeps it."""
    backend = getattr(args, "ddp_backend", None)  # argparse-style models see every flag
    if backend is None and OmegaConf.is_config(args) and args._get_parent() is not None:
        # a dataclass model's config is one node of fairseq's whole config
        backend = OmegaConf.select(args._get_parent(), "distributed_training.ddp_backend")
    return backend


def build_exchange(args, layout, experts):
    """How tokens reach experts on other ranks (None on one process or P = 1)."""
    if layout is None or layout.parallel_size == 1:
        return None
    dispatch = getattr(args, "moe_dispatch", "alltoall")
    if dispatch == "fairscale":
        return FairscaleExchange(layout, experts)
    if dispatch != "alltoall":
        raise HashConfigError(f"--moe-dispatch {dispatch!r} is unknown; valid: alltoall, fairscale")
    return AllToAllExchange(layout)


def build_hash_moe(args, dictionary, layer_idx: int, embed_dim: int, ffn_dim: int) -> MoELayer:
    learned = getattr(args, "router", "hash") != "hash"
    count = getattr(args, "hash_count", 1)
    check_hash_count(count, ffn_dim)
    if learned and count > 1:
        raise HashConfigError(f"--hash-count {count} needs --router hash (MultiHash is a hash router)")
    layout = expert_layout(args.hash_experts, getattr(args, "moe_expert_parallel_size", 0))
    if layout is not None:
        check_ddp_backend(ddp_backend_of(args))
        if getattr(args, "router", "hash") == "base" and layout.parallel_size > 1:
            raise HashConfigError(
                "--router base solves one assignment over one process's tokens; with "
                "experts on several ranks use --router hash, switch or top2, or "
                "--moe-expert-parallel-size 1 (every expert on every rank)")
    if not learned:
        score = getattr(args, "hash_score", "none")
        gate = None if score == "none" else HashScoreGate(
            embed_dim, args.hash_experts, score, getattr(args, "hash_score_scale", 1.0))
        router = build_hash_router(args, dictionary, layer_idx, count, gate)
    shared_ffn_dim = getattr(args, "hash_shared_ffn_dim", 0) or ffn_dim
    ffn_dim = getattr(args, "hash_expert_ffn_dim", 0) or ffn_dim
    # Experts and learned routers draw from generators of their own, seeded by
    # --seed (fairseq's torch seed) and the layer: the shared weights and
    # fairseq's random stream (dropout) stay exactly those of transformer_lm.
    seed = torch.initial_seed() + 7919 * (layer_idx + 1)
    shard = dict(shard=layout.shard, num_shards=layout.parallel_size) if layout else {}
    if count == 1:
        experts = ExpertFFN(args.hash_experts, embed_dim, ffn_dim, seed=seed, **shard)
    else:
        experts = SegmentedExpertFFN(args.hash_experts, embed_dim, ffn_dim, count, seed=seed,
                                     **shard)
    if learned:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, restored after
            torch.default_generator.manual_seed(seed)
            router = build_learned_router(args.router, embed_dim, args.hash_experts,
                                          getattr(args, "capacity_factor", 1.25))
    if layout is not None:
        sync_expert_gradients(list(experts.parameters()), layout)
    exchange = build_exchange(args, layout, experts)
    if getattr(args, "hash_shared_experts", 0):
        with torch.random.fork_rng(devices=[]):  # a generator of their own, as the router's
            torch.default_generator.manual_seed(seed + 1)
            shared = SharedExperts(args.hash_shared_experts, embed_dim, shared_ffn_dim)
        return SharedExpertMoELayer(router, experts, shared, exchange)
    return MoELayer(router, experts, exchange)


def pass_route_through(layer: nn.Module, moe: MoELayer):
    """Hand the routing of the current forward pass to ``moe`` as a call argument.

    The decoder leaves the route in ``moe.next_route`` before its layers run.
    This wrapper reads it when fairseq calls the layer and passes it on as an
    argument, which the layer's MoE sees for the duration of the call. Under
    ``--checkpoint-activations`` fairseq's checkpoint wrapper re-runs the layer
    in the backward pass, after the decoder has moved on: it replays the
    arguments it was given, so the recomputation routes as the forward did,
    even when several forwards run before one backward.
    """
    checkpointed = layer.forward
    plain = getattr(layer, "precheckpoint_forward", None) or checkpointed

    def routed(*args, _hash_route=(None, None), **kwargs):
        moe.route_inputs, moe.planned_counts = _hash_route
        try:
            return plain(*args, **kwargs)
        finally:
            moe.route_inputs = moe.planned_counts = None

    if plain is not checkpointed:
        # fairseq's checkpoint_wrapper: partial(_checkpointed_forward, forward, offload)
        call = functools.partial(checkpointed.func, routed, *checkpointed.args[1:],
                                 **checkpointed.keywords)
    else:
        call = routed

    def forward(*args, **kwargs):
        return call(*args, _hash_route=moe.next_route, **kwargs)

    moe.next_route = (None, None)
    layer.forward = forward


def log_expected_load(moe_layers, dictionary):
    counts = token_counts(dictionary)
    for idx, moe in moe_layers.items():
        router = moe.router
        if not isinstance(router, HashRouter) or router.missing_file:
            continue  # a learned router (load learned, not known ahead), or no table yet
        if not router.hash_fn.token_rows:
            continue  # not a token table (e.g. position); load depends on the data
        # a top-k table's k columns are all slots of a token: each counts
        share = expected_load(router.table, counts, router.num_experts)[:router.topk].mean(0)
        logger.info(
            f"hash layer {idx} ({router.hash_fn.name}, {router.num_experts} experts): "
            f"expected share per expert min {share.min():.4f} max {share.max():.4f}, "
            f"max/mean {share.max() * router.num_experts:.3f}"
        )


class HashTransformerDecoder(TransformerDecoder):
    """TransformerDecoder whose layers ``--hash-layer`` route their FFN by hash."""

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False,
                 output_projection=None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self.add_hash_layers(args, dictionary)

    @classmethod
    def adopt(cls, decoder: TransformerDecoder, args, dictionary) -> "HashTransformerDecoder":
        """Turn a decoder fairseq has built into this class, in place.

        fairseq's ``TransformerLanguageModel.build_model`` constructs its
        ``TransformerDecoder`` by name; adopting it (rather than building a
        second one) keeps every shared weight exactly as transformer_lm
        initialises it under the same --seed.
        """
        decoder.__class__ = cls
        decoder.add_hash_layers(args, dictionary)
        return decoder

    def add_hash_layers(self, args, dictionary):
        check_hash_args(args)
        self.hash_layer_ids = parse_hash_layers(args.hash_layer, len(self.layers))
        self.moe_layers = {}
        for idx in self.hash_layer_ids:
            layer = self.layers[idx]
            moe = build_hash_moe(args, dictionary, idx, layer.embed_dim, layer.fc1.out_features)
            replace_ffn(layer, moe)
            pass_route_through(layer, moe)
            self.moe_layers[idx] = moe
        log_expected_load(self.moe_layers, dictionary)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        for idx, moe in self.moe_layers.items():
            router = f"{name}.layers.{idx}.fc1.router"
            if isinstance(moe.router, HashRouter) and f"{router}.table" in state_dict:
                saved = moe.router.saved_hash_type(state_dict, router)
                if saved != moe.router.hash_fn.name:
                    raise HashConfigError(
                        f"hash layer {idx} of the checkpoint was trained with --hash-type "
                        f"{saved} but --hash-type is {moe.router.hash_fn.name}; use the "
                        f"checkpoint's value"
                    )
            key = f"{name}.layers.{idx}.fc1.experts.fc1_weight"
            # all K FFNs of the layer, whichever share of them this rank holds
            num_ffns = moe.experts.total_experts
            if key in state_dict and state_dict[key].size(0) != num_ffns:
                raise HashConfigError(
                    f"the checkpoint has {state_dict[key].size(0)} experts in hash layer {idx} "
                    f"but --hash-experts is {num_ffns}; use the checkpoint's value"
                )
            table = state_dict.get(f"{name}.layers.{idx}.fc1.router.table")
            if table is not None and table.size(1) != moe.router.table.size(1):
                per_hash = moe.router.hash_fn.columns_per_hash
                # a top-k table has a column per expert of a token, MultiHash one per hash
                what, flag = (("expert(s) per token", "--hash-topk")
                              if getattr(moe.router, "topk", 1) > 1 else ("hash(es)", "--hash-count"))
                raise HashConfigError(
                    f"the checkpoint has {table.size(1) // per_hash} {what} in hash layer "
                    f"{idx} but {flag} is {moe.router.table.size(1) // per_hash}; use "
                    f"the checkpoint's value"
                )
            missing = f"{name}.layers.{idx}.fc1.router.table"
            if missing not in state_dict and f"{name}.layers.{idx}.fc1.weight" in state_dict:
                raise HashConfigError(
                    f"layer {idx} of the checkpoint is a dense FFN, not a hash layer; "
                    f"check --hash-layer (this model routes layers {self.hash_layer_ids})"
                )

    def route_inputs(self, prev_output_tokens, incremental_state=None) -> RouteInputs:
        route = RouteInputs.from_tokens(
            prev_output_tokens, self.dictionary.pad(), self.dictionary.eos()
        )
        return route.last() if incremental_state is not None else route

    def plan_exchanges(self, route: RouteInputs):
        """Every expert-parallel hash layer's counts of all ranks, in one collective.

        A hash layer's routing depends on token ids alone, so the exchange
        sizes of all of them are known before the first layer runs.
        """
        planned = {idx: moe for idx, moe in self.moe_layers.items()
                   if moe.exchange is not None and isinstance(moe.router, HashRouter)}
        if not planned:
            return {}
        counts = torch.stack([
            torch.bincount(moe.router(None, route).indices.reshape(-1),
                           minlength=moe.num_experts)
            for moe in planned.values()])  # [layers, E]
        layout = next(iter(planned.values())).exchange.layout
        everyone = gather_counts(counts, layout)  # [P, layers, E]
        return {idx: everyone[:, i] for i, idx in enumerate(planned)}

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         **kwargs):
        route = self.route_inputs(prev_output_tokens, incremental_state)
        plans = self.plan_exchanges(route)
        for idx, moe in self.moe_layers.items():
            moe.next_route = (route, plans.get(idx))
        try:
            return super().extract_features(
                prev_output_tokens, encoder_out, incremental_state, **kwargs
            )
        finally:
            for moe in self.moe_layers.values():
                moe.next_route = (None, None)
