"""``--criterion moe_cross_entropy``: cross entropy plus the routers' auxiliary losses.

    fairseq-train ... --router switch --criterion moe_cross_entropy --moe-aux-loss-weight 0.01

The training loss is ``CE + W * sum over MoE layers of aux_loss`` (per token,
like the cross entropy it is added to). The logged ``loss`` and ``ppl`` stay
the plain cross entropy, so models are compared on equal terms; two more
values are logged: ``moe_aux_loss`` (the summed auxiliary loss, 0 for hash
routing and BASE) and ``moe_dropped`` (the share of expert slots dropped over
capacity, 0 where nothing is dropped). The same for other criteria:
moe_criterions.py.
"""
from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from .moe_aux import MoEAuxLoss, MoEAuxLossConfig, moe_layers  # noqa: F401


@dataclass
class MoECrossEntropyCriterionConfig(CrossEntropyCriterionConfig, MoEAuxLossConfig):
    pass


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyCriterionConfig)
class MoECrossEntropyCriterion(MoEAuxLoss, CrossEntropyCriterion):
    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
