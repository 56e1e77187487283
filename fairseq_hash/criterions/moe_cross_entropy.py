"""``--criterion moe_cross_entropy``: cross entropy plus the routers' auxiliary losses.

    fairseq-train ... --router switch --criterion moe_cross_entropy --moe-aux-loss-weight 0.01

The training loss is ``CE + W * sum over MoE layers of aux_loss`` (per token,
like the cross entropy it is added to). The logged ``loss`` and ``ppl`` stay
the plain cross entropy, so models are compared on equal terms; two more
values are logged: ``moe_aux_loss`` (the summed auxiliary loss, 0 for hash
routing and BASE) and ``moe_dropped`` (the share of expert slots dropped over
capacity, 0 where nothing is dropped).
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.logging import metrics

from ..errors import HashConfigError
from ..moe_layer import MoELayer


@dataclass
class MoECrossEntropyCriterionConfig(CrossEntropyCriterionConfig):
    moe_aux_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "weight of the routers' auxiliary (load-balancing) loss added to the "
            "cross entropy; 0.01 as in Switch Transformers and GShard (hash and BASE "
            "routing have none)"
        },
    )


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyCriterionConfig)
class MoECrossEntropyCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, moe_aux_loss_weight):
        super().__init__(task, sentence_avg)
        if moe_aux_loss_weight < 0:
            raise HashConfigError(
                f"--moe-aux-loss-weight {moe_aux_loss_weight}: must be 0 or more"
            )
        self.aux_weight = moe_aux_loss_weight

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        aux, dropped, slots = loss.new_zeros(()), 0, 0
        for moe in moe_layers(model):
            if moe.aux_loss is not None:
                aux = aux + moe.aux_loss.to(aux.dtype)
            if moe.last_indices is not None:
                dropped += int(moe.num_dropped)
                slots += moe.last_indices.numel()
        if self.aux_weight and aux.requires_grad:
            # the summed loss is divided by sample_size before the update
            loss = loss + self.aux_weight * aux * sample_size
        logging_output["moe_aux_loss"] = float(aux.detach()) * sample_size
        logging_output["moe_dropped"] = dropped
        logging_output["moe_slots"] = slots
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        aux = sum(log.get("moe_aux_loss", 0) for log in logging_outputs)
        dropped = sum(log.get("moe_dropped", 0) for log in logging_outputs)
        slots = sum(log.get("moe_slots", 0) for log in logging_outputs)
        metrics.log_scalar("moe_aux_loss", aux / max(sample_size, 1), sample_size, round=4)
        metrics.log_scalar("moe_dropped", dropped / max(slots, 1), slots, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
