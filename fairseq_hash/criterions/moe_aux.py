"""The routers' auxiliary losses added to any fairseq criterion.

    class MoELabelSmoothedCrossEntropy(MoEAuxLoss, LabelSmoothedCrossEntropyCriterion): ...

The training loss becomes ``loss + W * sum over MoE layers of aux_loss`` (per
unit of the criterion's sample size, like the loss it is added to); the
logged loss stays the criterion's own, and ``moe_aux_loss`` and
``moe_dropped`` (the share of expert slots dropped over capacity) are logged
beside it. Hash routing has no auxiliary loss, so a hash model trains the same
with or without the ``moe_`` criterion; learned routers (switch, top2) need it
for their load balancing.
"""
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..errors import HashConfigError
from ..moe_layer import MoELayer


@dataclass
class MoEAuxLossConfig(FairseqDataclass):
    moe_aux_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "weight of the routers' auxiliary (load-balancing) loss added to the "
            "criterion's loss; 0.01 as in Switch Transformers and GShard (hash and BASE "
            "routing have none)"
        },
    )


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class MoEAuxLoss:
    """Mixin, listed before a fairseq criterion class."""

    @classmethod
    def build_criterion(cls, cfg, task):
        criterion = super().build_criterion(cfg, task)
        if cfg.moe_aux_loss_weight < 0:
            raise HashConfigError(
                f"--moe-aux-loss-weight {cfg.moe_aux_loss_weight}: must be 0 or more")
        criterion.aux_weight = cfg.moe_aux_loss_weight
        return criterion

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

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        aux = sum(log.get("moe_aux_loss", 0) for log in logging_outputs)
        dropped = sum(log.get("moe_dropped", 0) for log in logging_outputs)
        slots = sum(log.get("moe_slots", 0) for log in logging_outputs)
        metrics.log_scalar("moe_aux_loss", aux / max(sample_size, 1), sample_size, round=4)
        metrics.log_scalar("moe_dropped", dropped / max(slots, 1), slots, round=4)
