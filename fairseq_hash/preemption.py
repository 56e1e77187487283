"""Save on the scheduler's signal: SIGTERM or SIGUSR1 ends fairseq-train with a checkpoint.

    fairseq-train ... --user-dir $(fairseq-hash-user-dir)      # SLURM: scancel -s TERM / --signal
    kill -TERM <pid of any rank>    # every rank finishes its update, checkpoint_last is
                                    # written, every rank exits 143 (128 + SIGTERM)

fairseq saves nothing when it is told to stop. With the plugin loaded, a Trainer
(fairseq-train, python -m fairseq_hash.cli.torchrun_train) catches SIGTERM and
SIGUSR1 on every rank; the update in flight finishes; the ranks agree on the
stop through the sum fairseq already takes of each update's statistics
(``Trainer._aggregate_logging_outputs``: the flag is one more number summed, so
the agreement costs no collective of its own), so that a signal to one rank
stops them all after the same update; fairseq then stops as at its
``--max-update`` (the run's ``max_update`` set to the update reached), which
validates and writes ``checkpoint_last`` (sharded where experts are spread) as
a save at the end of training does; and each rank exits with ``128 + signal``,
which torchrun and schedulers read as a failed run to restart or requeue.
Resuming continues mid-epoch from the saved update. A second signal while the
checkpoint is written changes nothing: the handler only sets the flag.
``--no-save-on-signal`` leaves the signals to Python's defaults, as does a
Python program that builds a Trainer itself (only commands set handlers).
"""
import functools
import logging
import signal
import sys

from .errors import running_as_command

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _Stop:
    signum = 0  # the signal this rank received (0: none)
    agreed = False  # some rank received one (summed over the ranks)
    stopping = False  # fairseq was told to stop after this update


def _request(signum, frame):
    if not _Stop.signum:
        _Stop.signum = signum
        logger.warning(f"{signal.Signals(signum).name}: the update in flight finishes, then "
                       f"checkpoint_last is saved and training exits")


def _exit_code() -> int:
    return 128 + (_Stop.signum or signal.SIGTERM)


def install_save_on_signal():
    """Wrap fairseq's Trainer (once): handlers at its construction, the agreement in its
    statistics' sum, the stop after its update, the exit after the save."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    if getattr(Trainer.__init__, "_fairseq_hash", False):
        return
    init, step, aggregate = Trainer.__init__, Trainer.train_step, Trainer._aggregate_logging_outputs

    @functools.wraps(init)
    def __init__(self, cfg, *args, **kwargs):
        init(self, cfg, *args, **kwargs)
        # signal handlers are the process's: only fairseq's tools and ours set them
        if getattr(cfg.model, "no_save_on_signal", False) or not running_as_command():
            return
        for signum in STOP_SIGNALS:
            signal.signal(signum, _request)
        # after the model is built: outside any wrapper the model installed (sharded saves)
        _exit_after_save(checkpoint_utils)

    @functools.wraps(aggregate)
    def _aggregate_logging_outputs(self, logging_outputs, *extra_stats_to_sum, ignore=False):
        logging_outputs, extra = aggregate(self, logging_outputs, *extra_stats_to_sum,
                                           float(bool(_Stop.signum)), ignore=ignore)
        _Stop.agreed = _Stop.agreed or float(extra[-1]) > 0
        return logging_outputs, extra[:-1]

    @functools.wraps(step)
    def train_step(self, samples, *args, **kwargs):
        out = step(self, samples, *args, **kwargs)
        asked = _Stop.agreed if self.data_parallel_world_size > 1 else bool(_Stop.signum)
        if asked and not _Stop.stopping:
            _Stop.stopping = True
            # fairseq's own stop: validate_and_save sees num_updates >= max_update
            self.cfg.optimization.max_update = self.get_num_updates()
        return out

    __init__._fairseq_hash = True
    Trainer.__init__ = __init__
    Trainer._aggregate_logging_outputs = _aggregate_logging_outputs
    Trainer.train_step = train_step


def _exit_after_save(checkpoint_utils):
    save = checkpoint_utils.save_checkpoint
    if getattr(save, "_exits_after_stop", False):
        return

    @functools.wraps(save)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        result = save(cfg, trainer, epoch_itr, val_loss)
        if _Stop.stopping:
            logger.warning(f"saved at update {trainer.get_num_updates()} on the signal; exiting "
                           f"with {_exit_code()} (resume with the same command)")
            sys.exit(_exit_code())
        return result

    save_checkpoint._exits_after_stop = True
    checkpoint_utils.save_checkpoint = save_checkpoint
