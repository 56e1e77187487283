"""Hash layers in a fairseq encoder or decoder: where they are, their route, their checkpoints.

    class HashTransformerDecoder(HashLayers, TransformerDecoder): ...
    decoder.add_hash_layers(spec, dictionary, "0,-1", flag="--hash-layer")
    with decoder.routing(RouteInputs.from_tokens(tokens, pad, eos)):
        ...  # fairseq's own forward; every hash layer routes by ``tokens``

The encoder (``hash_encoder.py``) and the decoder (``hash_decoder.py``) of
every hash model share this mixin.
"""
import logging
from contextlib import contextmanager
from typing import List


from ..errors import HashConfigError
from ..expert_parallel import ExpertGradientSync, world_size
from ..expert_shards import num_rows
from ..hashing import RouteInputs, expected_load, token_counts
from ..moe_factory import build_hash_moe
from ..moe_layer import plan_hash_dispatch
from ..offload import build_expert_cache, plan_prefetch
from ..route import Route
from ..routers import HashRouter
from ..spec import HashLayerSpec
from .fairseq_surgery import pass_route_through, replace_ffn

logger = logging.getLogger(__name__)


def parse_hash_layers(value: str, num_layers: int, flag: str = "--hash-layer",
                      layers_flag: str = "--decoder-layers", allow_none: bool = False) -> List[int]:
    """``"0,-1"`` -> sorted 0-based layer indices; negative ones count from the end.

    ``flag`` and ``layers_flag`` name the flags in error messages. An empty
    ``value`` is refused unless ``allow_none`` (one side of an encoder-decoder).
    """
    try:
        raw = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        raise HashConfigError(
            f"{flag} {value!r}: expected comma-separated integers such as 0,-1"
        ) from None
    if not raw and not allow_none:
        side = layers_flag[2:].split("-")[0]
        raise HashConfigError(
            f"{flag} {value!r} names no layer; give comma-separated {side} layer "
            f"indices such as 0,-1 (without hash layers, use fairseq's dense --arch)"
        )
    layers = {}
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise HashConfigError(
                f"{flag} {i} is outside the model: with {layers_flag} "
                f"{num_layers} valid indices are {-num_layers}..{num_layers - 1}"
            )
        if i % num_layers in layers:
            raise HashConfigError(
                f"{flag} {value}: {layers[i % num_layers]} and {i} name the same layer "
                f"({i % num_layers} of {layers_flag} {num_layers}); give each layer once"
            )
        layers[i % num_layers] = i
    return sorted(layers)


def prune_hash_layers(args, side: str, attr: str, flag: str, allow_none: bool = False):
    """fairseq's LayerDrop pruning (``--{side}-layers-to-keep``) applied to the hash
    layers that ``args.<attr>`` (``flag``) names.

    fairseq builds the pruned model with as many layers as are kept and renumbers
    the checkpoint's kept layers 0, 1, ... (``checkpoint_utils.prune_state_dict``;
    ``HashModel.load_state_dict`` has it do so first). The pruned model's hash
    layers are the kept layers that were hash layers, renumbered with them:
    ``args.<attr>`` is rewritten to their new indices, which is also what a
    checkpoint of the pruned model says.
    """
    keep = getattr(args, f"{side}_layers_to_keep", None)
    if not keep:
        return
    # "0,2" as fairseq's prune parses it (a list where a config's type made one)
    kept = sorted(int(i) for i in (keep if isinstance(keep, (list, tuple)) else str(keep).split(",")))
    hashed = parse_hash_layers(getattr(args, attr), getattr(args, f"{side}_layers"), flag,
                               f"--{side}-layers", allow_none)
    renumbered = [kept.index(i) for i in hashed if i in kept]
    if hashed and not renumbered and not allow_none:
        raise HashConfigError(
            f"--{side}-layers-to-keep {keep} keeps none of the {side} hash layers {hashed} "
            f"({flag}); keep one of them (without hash layers, use fairseq's dense --arch)")
    left_out = [i for i in hashed if i not in kept]
    if left_out:
        logger.info(f"--{side}-layers-to-keep {keep} leaves out {side} hash layer(s) {left_out}; "
                    f"the pruned model's hash layers are {renumbered}")
    setattr(args, attr, ",".join(map(str, renumbered)))


def log_expected_load(moe_layers, dictionary, side: str = "decoder"):
    counts = token_counts(dictionary)
    for idx, moe in moe_layers.items():
        router = moe.router
        if not isinstance(router, HashRouter) or router.missing_file:
            continue  # a learned router (load learned, not known ahead), or no table yet
        if not router.hash_fn.token_rows:
            continue  # not a token table (e.g. position); load depends on the data
        # a top-k table's k columns are all slots of a token: each counts
        share = expected_load(router.table, counts, router.total_experts)[:router.topk].mean(0)
        logger.info(
            f"{side} hash layer {idx} ({router.hash_fn.name}, {router.total_experts} experts): "
            f"expected share per expert min {share.min():.4f} max {share.max():.4f}, "
            f"max/mean {share.max() * router.total_experts:.3f}"
        )


class HashLayers:
    """Mixin for fairseq's TransformerEncoder and TransformerDecoder: hash layers in place of FFNs.

        class HashTransformerEncoder(HashLayers, TransformerEncoder): ...
        module.add_hash_layers(spec, dictionary, "0,-1", flag="--encoder-hash-layer")
        with module.routing(RouteInputs.from_tokens(tokens, pad, eos)):
            ...  # fairseq's own forward; the hash layers route by ``tokens``

    The module keeps ``hash_layer_ids`` and ``moe_layers`` (layer index ->
    MoELayer); loading a state dict refuses a checkpoint whose hash layers
    differ from the module's in experts, hashes or place.
    """

    side = "decoder"  # names the module in logs and error messages

    def add_hash_layers(self, spec: HashLayerSpec, dictionary, layers: str, flag: str,
                        seed_offset: int = 0, allow_none: bool = False):
        """Route the FFNs of ``layers`` (the value of ``flag``) by ``dictionary``'s tokens.

        Layer i's experts and random table are seeded by ``seed_offset + i``, so
        that an encoder's and a decoder's layer i start apart.
        """
        spec.validate(self.layers[0].fc1.out_features, f"--{self.side}-ffn-embed-dim", world_size())
        self.hash_flag = flag
        self.hash_layer_ids = parse_hash_layers(layers, len(self.layers), flag,
                                                f"--{self.side}-layers", allow_none)
        self.moe_layers = {}
        self.expert_cache = build_expert_cache(spec)  # None: experts stay resident
        for idx in self.hash_layer_ids:
            layer = self.layers[idx]
            moe = build_hash_moe(spec, dictionary, seed_offset + idx, layer.embed_dim,
                                 layer.fc1.out_features, sync_gradients=False,
                                 cache=self.expert_cache)
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

    def plan_dispatch(self, inputs: RouteInputs):
        """Every hash layer's dispatch of this forward pass, with one read from the device.

        A hash layer's routing depends on token ids alone, so the counts and
        exchange sizes of all of them are known before the first layer runs
        (see moe_layer.plan_hash_dispatch). Learned routers plan nothing.
        """
        planned = {idx: moe for idx, moe in self.moe_layers.items() if moe.plans_ahead}
        if not planned:
            return {}
        return dict(zip(planned, plan_hash_dispatch(list(planned.values()), inputs)))

    def announce_next(self, tokens):
        """(offloaded experts, prefetch) The token ids of the forward pass after the
        next one to start, known ahead (fairseq-eval-lm's next batch:
        ``offload/lookahead.py``): when that next pass starts, the experts of this
        following one are announced after its own, and load as the cache frees room."""
        self.next_tokens = tokens

    def _plan_following(self):
        tokens, self.next_tokens = getattr(self, "next_tokens", None), None
        if tokens is None:
            return {}
        return self.plan_dispatch(self.route_inputs(tokens.to(self.embed_tokens.weight.device)))

    @contextmanager
    def routing(self, inputs: RouteInputs):
        """Give every hash layer the route of one forward pass (see fairseq_surgery)."""
        self.gradient_sync.begin()
        plans = self.plan_dispatch(inputs)
        if getattr(self, "expert_cache", None) is not None:
            # loads start now: this pass's experts, then the following pass's if known
            plans = plan_prefetch(self.moe_layers, plans, self._plan_following())
        for idx, moe in self.moe_layers.items():
            moe.route = Route(inputs, plans.get(idx))
        try:
            yield
        finally:
            for moe in self.moe_layers.values():
                moe.route = None

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: one line here
        # rather than TorchScript's error deep inside the layers' route passing
        raise HashConfigError(
            f"TorchScript (torch.jit.script) cannot compile this model's {self.side} hash "
            f"layers yet: their routing runs in Python (the route handed to each layer, the "
            f"hash functions, the experts' grouped compute); deploy the eager model "
            f"(fairseq-generate, fairseq-interactive or the hub interface)")

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        for idx, moe in self.moe_layers.items():
            layer = f"{name}.layers.{idx}"
            router = f"{layer}.fc1.router"
            if isinstance(moe.router, HashRouter) and f"{router}.table" in state_dict:
                moe.router.add_missing_hash_type(state_dict, router)
                saved = moe.router.saved_hash_type(state_dict, router)
                if saved != moe.router.hash_fn.name:
                    raise HashConfigError(
                        f"{self.side} hash layer {idx} of the checkpoint was trained with "
                        f"--hash-type {saved} but --hash-type is {moe.router.hash_fn.name}; "
                        f"use the checkpoint's value"
                    )
            key = f"{layer}.fc1.experts.fc1_weight"
            # all K FFNs of the layer, whichever share of them this rank holds
            total = moe.experts.total_experts
            if key in state_dict and num_rows(state_dict[key]) != total:
                raise HashConfigError(
                    f"the checkpoint has {num_rows(state_dict[key])} experts in {self.side} hash "
                    f"layer {idx} "
                    f"but --hash-experts is {total}; use the checkpoint's value"
                )
            table = state_dict.get(f"{router}.table")
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
            if f"{router}.table" not in state_dict and f"{layer}.fc1.weight" in state_dict:
                raise HashConfigError(
                    f"{self.side} layer {idx} of the checkpoint is a dense FFN, not a hash "
                    f"layer; "
                    f"check {self.hash_flag} (this model routes layers {self.hash_layer_ids}), "
                    f"or turn a dense checkpoint into a hash one with fairseq-hash-upcycle"
                )
