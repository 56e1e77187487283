"""``--arch hash_transformer_lm``: fairseq's transformer_lm with hash layers.

    fairseq-train data-bin --user-dir $(fairseq-hash-user-dir) \
        --task language_modeling --arch hash_transformer_lm \
        --hash-layer -1 --hash-experts 16 --hash-type balanced

Apart from the FFN sublayers named by ``--hash-layer``, the model is
fairseq's ``transformer_lm`` with the same defaults and the same initial
weights under the same ``--seed``; every architecture preset of transformer_lm
exists here with a ``hash_`` prefix.
"""
import logging
from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models import transformer_lm as fairseq_lm
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

from ..distributed_checkpoints import prepare_expert_parallel
from .hash_decoder import HashTransformerDecoder
from .hash_layers import HashLayerConfig, count_parameters  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class HashTransformerLanguageModelConfig(TransformerLanguageModelConfig, HashLayerConfig):
    pass


@register_model("hash_transformer_lm", dataclass=HashTransformerLanguageModelConfig)
class HashTransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.decoder = HashTransformerDecoder.adopt(model.decoder, args, task.target_dictionary)
        prepare_expert_parallel(model)
        shared, expert = count_parameters(model)
        logger.info(
            f"hash_transformer_lm: {shared:,} shared and {expert:,} expert parameters "
            f"({len(model.decoder.hash_layer_ids)} hash layers at "
            f"{model.decoder.hash_layer_ids}, {args.hash_experts} experts each)"
        )
        return model


def _register_presets():
    """hash_<preset> for every transformer_lm preset, with the same defaults."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_CONFIG_REGISTRY

    for arch, model_name in list(ARCH_MODEL_NAME_REGISTRY.items()):
        if model_name == "transformer_lm" and arch != "transformer_lm":
            register_model_architecture("hash_transformer_lm", "hash_" + arch)(
                ARCH_CONFIG_REGISTRY[arch]
            )


_register_presets()
