"""fairseq's ``--bf16`` without a TPU: on CUDA and on CPU, as ``--fp16`` is.

fairseq's ``options.parse_args_and_arch`` sets ``args.tpu = True`` whenever
``--bf16`` (or ``--memory-efficient-bf16``) is given (``if args.bf16:
args.tpu = True``), and the Trainer then stops in ``utils.get_tpu_device``
(fairseq issue #4696). The plugin is imported inside that parse, too late to
change it; every fairseq tool then hands the config to
``distributed_utils.call_main``, where :func:`install_bf16_without_tpu`
undoes the coupling: ``tpu`` back to False in every section of the config
unless ``--tpu`` was given.
"""
import functools
import logging
import sys

logger = logging.getLogger(__name__)

BF16_FLAGS = ("--bf16", "--memory-efficient-bf16")


def tpu_implied_by_bf16(cfg, argv) -> bool:
    """Whether ``cfg`` holds a TPU that only fairseq's --bf16 coupling asked for."""
    given = {a.split("=")[0] for a in argv}
    return (bool(cfg.common.tpu) and bool(cfg.common.bf16) and "--tpu" not in given
            and any(flag in given for flag in BF16_FLAGS))


def install_bf16_without_tpu():
    from fairseq.distributed import utils as distributed_utils

    call_main = distributed_utils.call_main
    if getattr(call_main, "_fairseq_hash", False):
        return

    @functools.wraps(call_main)
    def wrapped(cfg, main, **kwargs):
        if tpu_implied_by_bf16(cfg, sys.argv[1:]):
            # every section took args.tpu (distributed_training's picks fairseq's TPU
            # wrapper of the model on several ranks)
            for section in cfg.values():
                if hasattr(section, "keys") and "tpu" in section.keys():
                    section.tpu = False
            logger.info("--bf16 without --tpu: bf16 on this run's device (fairseq alone "
                        "would take it for a TPU)")
        return call_main(cfg, main, **kwargs)

    wrapped._fairseq_hash = True
    distributed_utils.call_main = wrapped
