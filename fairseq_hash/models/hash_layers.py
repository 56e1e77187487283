"""What every hash model shares: its flags, building the hash layers, checking them.

    moe = build_hash_moe(args, dictionary, layer_idx, embed_dim, ffn_dim)
    replace_ffn(fairseq_layer, moe)      # the layer's FFN sublayer is now routed

``hash_transformer_lm``, ``hash_transformer`` and ``hash_roberta`` build their
hash layers here, on the encoder's or the decoder's fairseq layers alike.
"""
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from omegaconf import OmegaConf

from ..errors import HashConfigError
from ..experts import ExpertFFN
from ..expert_parallel import (AllToAllExchange, check_ddp_backend, expert_layout,
                               sync_expert_gradients)
from ..fairscale_dispatch import FairscaleExchange
from ..hashing import (HASH_REGISTRY, build_hash_function, dictionary_fingerprint,
                       expected_load, token_counts)
from ..moe_layer import MoELayer
from ..multihash import MultiHashRouter, SegmentedExpertFFN, check_hash_count
from ..routers import ROUTERS, HashRouter, build_learned_router
from ..table_file import load_table_file

logger = logging.getLogger(__name__)


@dataclass
class HashLayerConfig(FairseqDataclass):
    hash_layer: str = field(
        default="-1",
        metadata={
            "help": "comma-separated 0-based indices of the decoder layers whose FFN "
            "becomes a hash layer; negative indices count from the end (default -1: "
            "the last layer)"
        },
    )
    hash_experts: int = field(
        default=16, metadata={"help": "number of expert FFNs in each hash layer (K >= 2)"}
    )
    hash_type: str = field(
        default="balanced",
        metadata={
            "help": "hash function from token to expert: "
            + ", ".join(sorted(HASH_REGISTRY))
            + " (balanced: greedy over dict.txt counts; random: seeded table; bigram, "
            "previous, future, position: by token pair, previous token, next token "
            "(an oracle: no generation), position; clustered, dispersed: need --hash-file)"
        },
    )
    hash_seed: int = field(
        default=1,
        metadata={"help": "seed of random hash tables (layer i uses seed + i)"},
    )
    router: str = field(
        default="hash",
        metadata={
            "help": "how the routed layers choose experts: hash (the token's hash, no "
            "parameters), switch (learned top-1 gate), top2 (GShard top-2 gate, "
            "fairscale's Top2Gate) or base (BASE layers' balanced assignment); learned "
            "routers need --criterion moe_cross_entropy for their auxiliary loss"
        },
    )
    capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "--router switch: in training each expert takes at most "
            "capacity-factor * tokens / experts tokens of a batch; the rest skip the "
            "layer's FFN and are counted as dropped (top2 uses fairscale's fixed 2 * "
            "tokens / experts; evaluation drops nothing)"
        },
    )
    hash_count: int = field(
        default=1,
        metadata={
            "help": "MultiHash: number of hashes N; each picks the expert of one of N "
            "equal segments of the FFN's hidden units (--decoder-ffn-embed-dim must "
            "divide by N; 1: the plain hash layer)"
        },
    )
    hash_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "JSON table file from fairseq-hash-table (or your own, see "
            "docs/hash_tables.md) used by every hash layer instead of building one; "
            "its type, expert count and dictionary must match --hash-type, "
            "--hash-experts and the data"
        },
    )
    moe_expert_parallel_size: int = field(
        default=0,
        metadata={
            "help": "expert parallelism on several ranks: spread each hash layer's "
            "experts over groups of P ranks, K/P experts a rank, the W/P groups being "
            "data-parallel replicas (default 0: P = W when W divides K, else P = K when "
            "K divides W; 1: every expert on every rank)"
        },
    )
    moe_dispatch: str = field(
        default="alltoall",
        metadata={
            "help": "how tokens reach experts on other ranks: alltoall (sorted by expert, "
            "padded to the step's largest count, fairscale's all-to-all) or fairscale "
            "(fairscale's MOELayer with dense dispatch masks, for comparison)"
        },
    )



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


def build_hash_router(args, dictionary, layer_idx: int, count: int) -> HashRouter:
    hash_fn = build_hash_function(args.hash_type, args.hash_experts)
    router_cls = HashRouter if count == 1 else MultiHashRouter
    fingerprint = dictionary_fingerprint(dictionary)
    hash_file = getattr(args, "hash_file", None)
    if hash_file and not os.path.exists(hash_file):
        # fairseq rebuilds a model from its saved flags before loading its
        # weights, and the table is among them: a moved file is not needed then
        return router_cls.awaiting_checkpoint(hash_fn, args.hash_experts, fingerprint,
                                              hash_file, count)
    if hash_file:
        # one table from the file serves every hash layer
        table = load_table_file(hash_file, dictionary, args.hash_type, args.hash_experts, count)
    else:
        table = hash_fn.build_table(
            dictionary, args.hash_experts, num_hashes=count, seed=args.hash_seed + layer_idx
        )
    return router_cls(hash_fn, table, args.hash_experts, fingerprint)


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
        router = build_hash_router(args, dictionary, layer_idx, count)
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
    return MoELayer(router, experts, build_exchange(args, layout, experts))


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
        share = expected_load(router.table, counts, router.num_experts)[0]
        logger.info(
            f"hash layer {idx} ({router.hash_fn.name}, {router.num_experts} experts): "
            f"expected share per expert min {share.min():.4f} max {share.max():.4f}, "
            f"max/mean {share.max() * router.num_experts:.3f}"
        )


def count_parameters(model):
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
    total = sum(p.numel() for p in model.parameters())
    return total - expert, expert
