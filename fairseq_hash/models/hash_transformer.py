"""``--arch hash_transformer``: fairseq's encoder-decoder transformer with hash layers.

    fairseq-train data-bin --user-dir $(fairseq-hash-user-dir) \
        --task translation --arch hash_transformer \
        --encoder-hash-layer -1 --decoder-hash-layer -1 --hash-experts 16

The encoder's hash layers route by the source tokens with tables built from
the source dictionary; the decoder's route by the previous output tokens
with the target dictionary's. Apart from the routed FFN sublayers the model is
fairseq's ``transformer`` with the same defaults and the same initial weights
under the same ``--seed``; every ``transformer_*`` preset exists here with a
``hash_`` prefix.
"""
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model
from fairseq.models.transformer import TransformerModel

from ..errors import HashConfigError
from .config import EncoderDecoderHashConfig
from .hash_decoder import HashTransformerDecoder
from .hash_encoder import HashTransformerEncoder
from .hash_model import HashModel, register_hash_presets


@register_model("hash_transformer")
class HashTransformerModel(HashModel, TransformerModel):
    hash_config = EncoderDecoderHashConfig
    hash_layer_flags = (("encoder", "encoder_hash_layer", "--encoder-hash-layer", True),
                        ("decoder", "decoder_hash_layer", "--decoder-hash-layer", True))

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, EncoderDecoderHashConfig())

    @classmethod
    def adopt_hash_sides(cls, model, spec, args, task):
        # either side may have none ('') but not both
        model.encoder = HashTransformerEncoder.adopt(
            model.encoder, spec, task.source_dictionary, args.encoder_hash_layer, allow_none=True)
        # the decoder's layer i is seeded apart from the encoder's layer i
        model.decoder = HashTransformerDecoder.adopt(
            model.decoder, spec, task.target_dictionary, args.decoder_hash_layer,
            "--decoder-hash-layer", seed_offset=len(model.encoder.layers), allow_none=True)
        if not model.encoder.moe_layers and not model.decoder.moe_layers:
            raise HashConfigError(
                "--encoder-hash-layer and --decoder-hash-layer name no layer; give one of them "
                "(without hash layers, use fairseq's --arch transformer)")
        return {"encoder": model.encoder, "decoder": model.decoder}


register_hash_presets("transformer", "hash_transformer", EncoderDecoderHashConfig)
