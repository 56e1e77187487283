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

from ..distributed_checkpoints import prepare_expert_parallel
from .hash_encoder import HashTransformerEncoder
from .hash_layers import EncoderHashConfig, fill_hash_defaults, log_parameters, register_hash_presets


@register_model("hash_roberta")
class HashRobertaModel(RobertaModel):
    @classmethod
    def hub_models(cls):
        return {}

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        gen_parser_from_dataclass(parser, EncoderHashConfig())

    @classmethod
    def build_model(cls, args, task):
        fill_hash_defaults(args, EncoderHashConfig)
        model = super().build_model(args, task)
        encoder = model.encoder.sentence_encoder
        model.encoder.sentence_encoder = HashTransformerEncoder.adopt(
            encoder, args, task.source_dictionary, args.encoder_hash_layer)
        prepare_expert_parallel(model)
        log_parameters(model, "hash_roberta", {"encoder": model.encoder.sentence_encoder})
        return model


register_hash_presets("roberta", "hash_roberta", EncoderHashConfig)
