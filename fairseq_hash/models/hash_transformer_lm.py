"""``--arch hash_transformer_lm``: fairseq's transformer_lm with hash layers.

    fairseq-train data-bin --user-dir $(fairseq-hash-user-dir) \
        --task language_modeling --arch hash_transformer_lm \
        --hash-layer -1 --hash-experts 16 --hash-type balanced

Apart from the FFN sublayers named by ``--hash-layer``, the model is
fairseq's ``transformer_lm`` with the same defaults and the same initial
weights under the same ``--seed``; every architecture preset of transformer_lm
exists here with a ``hash_`` prefix.
"""
from argparse import SUPPRESS
from dataclasses import dataclass, field
from typing import Optional

from fairseq.models import register_model
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

from ..errors import HashConfigError
from .config import HashLayerConfig
from .hash_decoder import HashTransformerDecoder
from .hash_model import HashModel, register_hash_presets


@dataclass
class HashTransformerLanguageModelConfig(TransformerLanguageModelConfig, HashLayerConfig):
    # present only to be refused with a pointer to --hash-layer (hidden from --help)
    encoder_hash_layer: Optional[str] = field(default=None, metadata={"help": SUPPRESS})
    decoder_hash_layer: Optional[str] = field(default=None, metadata={"help": SUPPRESS})


@register_model("hash_transformer_lm", dataclass=HashTransformerLanguageModelConfig)
class HashTransformerLanguageModel(HashModel, TransformerLanguageModel):
    hash_config = HashLayerConfig
    hash_layer_flags = (("decoder", "hash_layer", "--hash-layer", False),)

    @classmethod
    def adopt_hash_sides(cls, model, spec, args, task):
        for flag in ("encoder_hash_layer", "decoder_hash_layer"):
            if getattr(args, flag, None) is not None:
                raise HashConfigError(
                    f"--{flag.replace('_', '-')} is for --arch hash_transformer or hash_roberta; "
                    f"hash_transformer_lm is a decoder-only model: name its hash layers with "
                    f"--hash-layer"
                )
        model.decoder = HashTransformerDecoder.adopt(model.decoder, spec, task.target_dictionary,
                                                     args.hash_layer)
        return {"decoder": model.decoder}


register_hash_presets("transformer_lm", "hash_transformer_lm", HashLayerConfig)
