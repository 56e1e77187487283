"""``--arch hash_roberta``: fairseq's RoBERTa (masked LM) with hash layers in its encoder.

    fairseq-train data-bin --user-dir $(fairseq-hash-user-dir) \
        --task masked_lm --criterion masked_lm --arch hash_roberta_base \
        --encoder-hash-layer -1 --hash-experts 16

The hash layers route by the input tokens as the encoder receives them:
a masked position routes by the mask symbol's id (``<mask>``), whatever token
it hides, and a position next to it sees ``<mask>`` as its previous or next
token. Fine-tuning (``--task sentence_prediction``) from a checkpoint keeps the
checkpoint's tables; a dictionary other than the one they were built for is
refused. Every ``roberta*`` preset exists here with a ``hash_`` prefix.
"""
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model
from fairseq.models.roberta import RobertaModel

from .config import EncoderHashConfig
from .hash_encoder import HashTransformerEncoder
from .hash_model import HashModel, register_hash_presets


@register_model("hash_roberta")
class HashRobertaModel(HashModel, RobertaModel):
    hash_config = EncoderHashConfig
    hash_layer_flags = (("encoder", "encoder_hash_layer", "--encoder-hash-layer", False),)

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        gen_parser_from_dataclass(parser, EncoderHashConfig())

    @classmethod
    def adopt_hash_sides(cls, model, spec, args, task):
        encoder = model.encoder.sentence_encoder
        model.encoder.sentence_encoder = HashTransformerEncoder.adopt(
            encoder, spec, task.source_dictionary, args.encoder_hash_layer)
        return {"encoder": model.encoder.sentence_encoder}


register_hash_presets("roberta", "hash_roberta", EncoderHashConfig)
