"""``--criterion moe_label_smoothed_cross_entropy``, ``moe_sentence_prediction``, ``moe_masked_lm``.

fairseq's criteria of the same names without ``moe_``, plus the routers'
auxiliary losses (see moe_aux.py), for learned routers in translation,
classification fine-tuning and masked-LM pretraining.
"""
from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion, LabelSmoothedCrossEntropyCriterionConfig)
from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss
from fairseq.criterions.sentence_prediction import (SentencePredictionConfig,
                                                    SentencePredictionCriterion)

from .moe_aux import MoEAuxLoss, MoEAuxLossConfig


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig,
                                         MoEAuxLossConfig):
    pass


@register_criterion("moe_label_smoothed_cross_entropy",
                    dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropy(MoEAuxLoss, LabelSmoothedCrossEntropyCriterion):
    pass


@dataclass
class MoESentencePredictionConfig(SentencePredictionConfig, MoEAuxLossConfig):
    pass


@register_criterion("moe_sentence_prediction", dataclass=MoESentencePredictionConfig)
class MoESentencePrediction(MoEAuxLoss, SentencePredictionCriterion):
    pass


@dataclass
class MoEMaskedLmConfig(MaskedLmConfig, MoEAuxLossConfig):
    pass


@register_criterion("moe_masked_lm", dataclass=MoEMaskedLmConfig)
class MoEMaskedLm(MoEAuxLoss, MaskedLmLoss):
    pass
