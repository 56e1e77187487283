"""What the three hash models share: building, presets, the parameter log line.

    @register_model("hash_roberta")
    class HashRobertaModel(HashModel, RobertaModel):
        hash_config = EncoderHashConfig          # the flags the model adds

        @classmethod
        def adopt_hash_sides(cls, model, spec, args, task):
            ...                                  # adopt the encoder and/or the decoder
            return {"encoder": encoder}          # side -> HashLayers module

    register_hash_presets("roberta", "hash_roberta", EncoderHashConfig)

``HashModel.build_model`` lets fairseq build the dense model first, so that
every shared weight starts exactly as the dense model's under the same
--seed, then turns the FFNs named by the flags into hash layers.
"""
import logging

from ..distributed_checkpoints import prepare_expert_parallel
from ..spec import HashLayerSpec
from .config import HashRoutingConfig, fill_hash_defaults
from .hash_layers import prune_hash_layers

logger = logging.getLogger(__name__)


class HashModel:
    """Mixin, listed before a fairseq model class."""

    hash_config = HashRoutingConfig
    # (side, args attribute, flag, whether the side may have none) of each hash-layer flag
    hash_layer_flags = ()

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def build_model(cls, args, task):
        fill_hash_defaults(args, cls.hash_config)
        for side, attr, flag, allow_none in cls.hash_layer_flags:
            # before fairseq's build sets --{side}-layers to the count it keeps
            prune_hash_layers(args, side, attr, flag, allow_none)
        model = super().build_model(args, task)
        sides = cls.adopt_hash_sides(model, HashLayerSpec.from_args(args), args, task)
        prepare_expert_parallel(model)
        log_parameters(model, sides)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # fairseq prunes LayerDrop's kept layers (*_layers_to_keep) only after
        # upgrade_state_dict_named, whose checks would then compare the model's
        # layer i with the checkpoint's unrenumbered layer i; pruned first, every
        # check sees the model's own layers, and fairseq's own prune finds
        # nothing left to do (it clears *_layers_to_keep in model_cfg)
        if model_cfg is not None:
            from fairseq.checkpoint_utils import prune_state_dict

            state_dict = prune_state_dict(state_dict, model_cfg)
        return super().load_state_dict(state_dict, strict, model_cfg, args)

    @classmethod
    def adopt_hash_sides(cls, model, spec: HashLayerSpec, args, task) -> dict:
        """Turn ``model``'s encoder and/or decoder into HashLayers modules; return them by side."""
        raise NotImplementedError


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


def count_parameters(model):
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
    total = sum(p.numel() for p in model.parameters())
    return total - expert, expert


def log_parameters(model, sides):
    """One line: shared and expert parameters, and where the hash layers are.

    ``sides`` maps a name ("encoder", "decoder") to its HashLayers module.
    """
    shared, expert = count_parameters(model)
    where = ", ".join(f"{len(m.hash_layer_ids)} {side} hash layers at {m.hash_layer_ids}"
                      for side, m in sides.items())
    experts = next((moe.experts for m in sides.values() for moe in m.moe_layers.values()), None)
    per_layer = getattr(experts, "total_experts", 0)
    logger.info(f"{type(model).__name__}: {shared:,} shared and {expert:,} expert parameters "
                f"({where}, {per_layer} experts each)")
