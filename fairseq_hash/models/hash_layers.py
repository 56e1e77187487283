"""What every hash model shares: its flags, building the hash layers, checking them.

    moe = build_hash_moe(args, dictionary, layer_idx, embed_dim, ffn_dim)
    replace_ffn(fairseq_layer, moe)      # the layer's FFN sublayer is now routed

``hash_transformer_lm``, ``hash_transformer`` and ``hash_roberta`` build their
hash layers here, on the encoder's or the decoder's fairseq layers alike.
"""
import functools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from omegaconf import OmegaConf

from ..errors import HashConfigError
from ..experts import ExpertFFN
from ..expert_parallel import (AllToAllExchange, ExpertGradientSync, check_ddp_backend,
                               expert_layout)
from ..fairscale_dispatch import FairscaleExchange
from ..hashing import (HASH_REGISTRY, RouteInputs, build_hash_function,
                       dictionary_fingerprint, expected_load, token_counts)
from ..moe_layer import MoELayer, plan_hash_dispatch
from ..multihash import MultiHashRouter, SegmentedExpertFFN, check_hash_count
from ..routers import ROUTERS, HashRouter, build_learned_router
from ..scores import HashScoreGate, check_score
from ..shared_experts import SharedExpertMoELayer, SharedExperts
from ..table_file import load_table_file

logger = logging.getLogger(__name__)


@dataclass
class HashRoutingConfig(FairseqDataclass):
    """How hash layers route, on whichever side of the model they are."""

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
        metadata={"help": "seed of random hash tables (layer i uses seed + i; in "
                  "hash_transformer, decoder layer i uses seed + encoder layers + i)"},
    )
    router: str = field(
        default="hash",
        metadata={
            "help": "how the routed layers choose experts: hash (the token's hash, no "
            "parameters), switch (learned top-1 gate), top2 (GShard top-2 gate, "
            "fairscale's Top2Gate) or base (BASE layers' balanced assignment); switch "
            "and top2 need a moe_ criterion for their auxiliary loss (moe_cross_entropy, "
            "moe_label_smoothed_cross_entropy, moe_sentence_prediction, moe_masked_lm)"
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
            "--hash-experts and the data. A .pt or .safetensors file holding an "
            "integer tensor tid2eid [vocabulary, --hash-topk] is imported as the table"
        },
    )
    hash_topk: int = field(
        default=1,
        metadata={
            "help": "experts per token k: every hash table gives each token k distinct "
            "experts, whose outputs are averaged or weighed by --hash-score (default 1: "
            "the paper's hash layer; not with --hash-count > 1)"
        },
    )
    hash_score: str = field(
        default="none",
        metadata={
            "help": "weights of a token's k experts: none (the paper: plain output for "
            "k=1, mean for k>1), or a learned linear gate over the hidden state, "
            "evaluated at the k hashed experts only: softmax, sigmoid or sqrt-softplus "
            "(normalised over the k when k>1)"
        },
    )
    hash_score_scale: float = field(
        default=1.0,
        metadata={"help": "--hash-score: every expert weight is multiplied by this (default 1)"},
    )
    hash_shared_experts: int = field(
        default=0,
        metadata={
            "help": "number of shared experts: dense FFNs every token of a hash layer "
            "passes through, added to the routed experts' output (default 0)"
        },
    )
    hash_shared_ffn_dim: int = field(
        default=0,
        metadata={
            "help": "hidden width of each shared expert (default 0: "
            "--decoder-ffn-embed-dim)"
        },
    )
    hash_expert_ffn_dim: int = field(
        default=0,
        metadata={
            "help": "hidden width of each routed expert (default 0: "
            "--decoder-ffn-embed-dim); e.g. half of it, with a shared expert of the "
            "other half, keeps a token's compute that of the dense FFN"
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
            "padded to the step's largest count, fairscale's all-to-all), alltoall-exact "
            "(torch's all_to_all_single with exact split sizes: no padding rows) or "
            "fairscale (fairscale's MOELayer with dense dispatch masks, for comparison)"
        },
    )


def _layers_field(side: str, routed_by: str = ""):
    return field(default="-1", metadata={"help": (
        f"comma-separated 0-based indices of the {side} layers whose FFN becomes a hash "
        f"layer; negative indices count from the end (default -1: the last layer; an "
        f"empty value: none){routed_by}")})


@dataclass
class HashLayerConfig(HashRoutingConfig):
    """``hash_transformer_lm``: hash layers in the decoder."""

    hash_layer: str = _layers_field("decoder")


@dataclass
class EncoderHashConfig(HashRoutingConfig):
    """``hash_roberta``: hash layers in the encoder, routed by the source tokens."""

    encoder_hash_layer: str = _layers_field(
        "encoder", "; routed by the source tokens, with the source dictionary's table")


@dataclass
class EncoderDecoderHashConfig(EncoderHashConfig):
    """``hash_transformer``: hash layers in the encoder and in the decoder."""

    decoder_hash_layer: str = _layers_field(
        "decoder", "; routed by the previous output tokens, with the target dictionary's table")


def fill_hash_defaults(args, config_cls):
    """Give an argparse model's ``args`` our flags' defaults where they are missing.

    fairseq's argparse models (``transformer``, ``roberta``) set their defaults
    in architecture functions, and a dense checkpoint's args lack our flags.
    """
    for name, value in vars(config_cls()).items():
        if not name.startswith("_") and not hasattr(args, name):
            setattr(args, name, value)


def register_hash_presets(base_model: str, hash_model: str, config_cls):
    """``hash_<arch>`` for every architecture of ``base_model``, with its defaults and ours."""
    from fairseq.models import (ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY,
                                ARCH_MODEL_REGISTRY, register_model_architecture)

    for arch, model_name in list(ARCH_MODEL_NAME_REGISTRY.items()):
        # a dataclass model has registered its own name as an architecture already
        if model_name != base_model or "hash_" + arch in ARCH_MODEL_REGISTRY:
            continue

        def preset(args, base=ARCH_CONFIG_REGISTRY[arch]):
            base(args)
            fill_hash_defaults(args, config_cls)

        register_model_architecture(hash_model, "hash_" + arch)(preset)

def parse_hash_layers(spec: str, num_layers: int, flag: str = "--hash-layer",
                      layers_flag: str = "--decoder-layers", allow_none: bool = False) -> List[int]:
    """``"0,-1"`` -> sorted 0-based layer indices; negative ones count from the end.

    ``flag`` and ``layers_flag`` name the flags in error messages. An empty
    ``spec`` is refused unless ``allow_none`` (one side of an encoder-decoder).
    """
    try:
        raw = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise HashConfigError(
            f"{flag} {spec!r}: expected comma-separated integers such as 0,-1"
        ) from None
    if not raw and not allow_none:
        side = layers_flag[2:].split("-")[0]
        raise HashConfigError(
            f"{flag} {spec!r} names no layer; give comma-separated {side} layer "
            f"indices such as 0,-1 (without hash layers, use fairseq's dense --arch)"
        )
    layers = set()
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise HashConfigError(
                f"{flag} {i} is outside the model: with {layers_flag} "
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
    if dispatch not in ("alltoall", "alltoall-exact"):
        raise HashConfigError(f"--moe-dispatch {dispatch!r} is unknown; valid: alltoall, "
                              f"alltoall-exact, fairscale")
    return AllToAllExchange(layout, exact=dispatch == "alltoall-exact")


def build_hash_moe(args, dictionary, layer_idx: int, embed_dim: int, ffn_dim: int,
                   sync_gradients: bool = True) -> MoELayer:
    """One routed FFN; ``sync_gradients``: its own ExpertGradientSync under expert
    parallelism (HashLayers gives all layers of a side one instead)."""
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
    if layout is not None and sync_gradients:
        ExpertGradientSync(layout).register(experts.parameters())
    exchange = build_exchange(args, layout, experts)
    if getattr(args, "hash_shared_experts", 0):
        with torch.random.fork_rng(devices=[]):  # a generator of their own, as the router's
            torch.default_generator.manual_seed(seed + 1)
            shared = SharedExperts(args.hash_shared_experts, embed_dim, shared_ffn_dim)
        moe = SharedExpertMoELayer(router, experts, shared, exchange)
    else:
        moe = MoELayer(router, experts, exchange)
    moe.layout = layout  # None on one process
    return moe


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
        moe.route_inputs, moe.plan = _hash_route
        try:
            return plain(*args, **kwargs)
        finally:
            moe.route_inputs = moe.plan = None

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


def log_expected_load(moe_layers, dictionary, side: str = "decoder"):
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
            f"{side} hash layer {idx} ({router.hash_fn.name}, {router.num_experts} experts): "
            f"expected share per expert min {share.min():.4f} max {share.max():.4f}, "
            f"max/mean {share.max() * router.num_experts:.3f}"
        )


def count_parameters(model):
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
    total = sum(p.numel() for p in model.parameters())
    return total - expert, expert


def log_parameters(model, arch: str, sides):
    """One line: shared and expert parameters, and where the hash layers are.

    ``sides`` maps a name ("encoder", "decoder") to its HashLayers module.
    """
    shared, expert = count_parameters(model)
    where = ", ".join(f"{len(m.hash_layer_ids)} {side} hash layers at {m.hash_layer_ids}"
                      for side, m in sides.items())
    experts = next((moe.experts for m in sides.values() for moe in m.moe_layers.values()), None)
    per_layer = getattr(experts, "total_experts", 0)
    logger.info(f"{arch}: {shared:,} shared and {expert:,} expert parameters "
                f"({where}, {per_layer} experts each)")


class HashLayers:
    """Mixin for fairseq's TransformerEncoder and TransformerDecoder: hash layers in place of FFNs.

        class HashTransformerEncoder(HashLayers, TransformerEncoder): ...
        module.add_hash_layers(args, dictionary, "0,-1", flag="--encoder-hash-layer")
        with module.routing(RouteInputs.from_tokens(tokens, pad, eos)):
            ...  # fairseq's own forward; the hash layers route by ``tokens``

    The module keeps ``hash_layer_ids`` and ``moe_layers`` (layer index ->
    MoELayer); loading a state dict refuses a checkpoint whose hash layers
    differ from the module's in experts, hashes or place.
    """

    side = "decoder"  # names the module in logs and error messages

    def add_hash_layers(self, args, dictionary, spec: str, flag: str, seed_offset: int = 0,
                        allow_none: bool = False):
        """Route the FFNs of the layers ``spec`` (the value of ``flag``) by ``dictionary``'s tokens.

        Layer i's experts and random table are seeded by ``seed_offset + i``, so
        that an encoder's and a decoder's layer i start apart.
        """
        check_hash_args(args)
        self.hash_flag = flag
        self.hash_layer_ids = parse_hash_layers(spec, len(self.layers), flag,
                                                f"--{self.side}-layers", allow_none)
        self.moe_layers = {}
        for idx in self.hash_layer_ids:
            layer = self.layers[idx]
            moe = build_hash_moe(args, dictionary, seed_offset + idx, layer.embed_dim,
                                 layer.fc1.out_features, sync_gradients=False)
            replace_ffn(layer, moe)
            pass_route_through(layer, moe)
            self.moe_layers[idx] = moe
        self.gradient_sync = self._gradient_sync()
        log_expected_load(self.moe_layers, dictionary, self.side)

    def _gradient_sync(self) -> ExpertGradientSync:
        """One sync for all hash layers of this side, anchored at its input embedding
        (autograd's last gradient of the side: see ExpertGradientSync)."""
        layout = next((moe.layout for moe in self.moe_layers.values()), None)
        sync = ExpertGradientSync(layout)
        for moe in self.moe_layers.values():
            sync.register(moe.experts.parameters())
        shared = [p for p in self.parameters() if not hasattr(p, "expert")]
        anchor = next((p for p in [self.embed_tokens.weight, *shared] if p.requires_grad), None)
        if anchor is not None:
            sync.set_anchor(anchor)
        if layout is not None:
            sync.follow_wrapper(self)
        return sync

    def plan_dispatch(self, route: RouteInputs):
        """Every hash layer's dispatch of this forward pass, with one read from the device.

        A hash layer's routing depends on token ids alone, so the counts and
        exchange sizes of all of them are known before the first layer runs
        (see moe_layer.plan_hash_dispatch). Learned routers plan nothing.
        """
        planned = {idx: moe for idx, moe in self.moe_layers.items() if moe.plans_ahead}
        if not planned:
            return {}
        return dict(zip(planned, plan_hash_dispatch(list(planned.values()), route)))

    @contextmanager
    def routing(self, route: RouteInputs):
        """Hand every hash layer the route inputs of one forward pass (see pass_route_through)."""
        self.gradient_sync.begin()
        plans = self.plan_dispatch(route)
        for idx, moe in self.moe_layers.items():
            moe.next_route = (route, plans.get(idx))
        try:
            yield
        finally:
            for moe in self.moe_layers.values():
                moe.next_route = (None, None)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        for idx, moe in self.moe_layers.items():
            router = f"{name}.layers.{idx}.fc1.router"
            if isinstance(moe.router, HashRouter) and f"{router}.table" in state_dict:
                saved = moe.router.saved_hash_type(state_dict, router)
                if saved != moe.router.hash_fn.name:
                    raise HashConfigError(
                        f"{self.side} hash layer {idx} of the checkpoint was trained with "
                        f"--hash-type {saved} but --hash-type is {moe.router.hash_fn.name}; "
                        f"use the checkpoint's value"
                    )
            key = f"{name}.layers.{idx}.fc1.experts.fc1_weight"
            # all K FFNs of the layer, whichever share of them this rank holds
            num_ffns = moe.experts.total_experts
            if key in state_dict and state_dict[key].size(0) != num_ffns:
                raise HashConfigError(
                    f"the checkpoint has {state_dict[key].size(0)} experts in {self.side} hash "
                    f"layer {idx} "
                    f"but --hash-experts is {num_ffns}; use the checkpoint's value"
                )
            table = state_dict.get(f"{name}.layers.{idx}.fc1.router.table")
            if table is not None and table.size(1) != moe.router.table.size(1):
                per_hash = moe.router.hash_fn.columns_per_hash
                # a top-k table has a column per expert of a token, MultiHash one per hash
                what, flag = (("expert(s) per token", "--hash-topk")
                              if getattr(moe.router, "topk", 1) > 1 else ("hash(es)", "--hash-count"))
                raise HashConfigError(
                    f"the checkpoint has {table.size(1) // per_hash} {what} in {self.side} "
                    f"hash layer {idx} but {flag} is {moe.router.table.size(1) // per_hash}; "
                    f"use the checkpoint's value"
                )
            missing = f"{name}.layers.{idx}.fc1.router.table"
            if missing not in state_dict and f"{name}.layers.{idx}.fc1.weight" in state_dict:
                raise HashConfigError(
                    f"{self.side} layer {idx} of the checkpoint is a dense FFN, not a hash "
                    f"layer; "
                    f"check {self.hash_flag} (this model routes layers {self.hash_layer_ids}), "
                    f"or turn a dense checkpoint into a hash one with fairseq-hash-upcycle"
                )
