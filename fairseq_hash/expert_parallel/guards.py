"""Guards that keep every rank in the same collectives: fairseq's recovery from
out-of-memory errors, which would skip or retry a batch on one rank alone, made
to fail instead."""
import functools

import torch.distributed as dist

from ..errors import HashConfigError

def fail_on_out_of_memory():
    """Make an out-of-memory error in a training or validation step end the run
    (once per process).

    fairseq's ``Trainer.train_step`` catches it, skips the micro-batch on that
    rank alone and goes on, and ``valid_step`` retries the batch on that rank
    alone, while the other ranks are in other collectives: a hang, or
    collectives paired with the wrong partner. Called with ``raise_oom=True``,
    both raise instead; we say why in one line.
    """
    from fairseq.trainer import Trainer

    for name in ("train_step", "valid_step"):
        step = getattr(Trainer, name)
        if not getattr(step, "_fairseq_hash", False):
            setattr(Trainer, name, _raising_out_of_memory(step, name))


def _raising_out_of_memory(step, name):
    @functools.wraps(step)
    def step_or_fail(self, sample, raise_oom=False):
        try:
            return step(self, sample, raise_oom=True)
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            what = "a training" if name == "train_step" else "a validation"
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise HashConfigError(
                f"rank {rank} ran out of device memory in {what} step; with "
                f"expert layers on several ranks fairseq cannot skip or retry a batch on one "
                f"rank alone: lower --max-tokens or --batch-size") from e

    step_or_fail._fairseq_hash = True
    return step_or_fail
