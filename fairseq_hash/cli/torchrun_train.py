"""fairseq-train as one process of a torchrun launch, on CPU or GPU, one node or several.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr HOST --master-port 29500 \\
        -m fairseq_hash.cli.torchrun_train data-bin --user-dir $(fairseq-hash-user-dir) \\
        --arch hash_transformer_lm ... [--cpu --ddp-backend legacy_ddp]

Every process gets fairseq-train's flags as given, plus the ones that tell it
its place: ``--distributed-world-size $WORLD_SIZE --distributed-rank $RANK
--device-id $LOCAL_RANK --distributed-init-method env:// --distributed-no-spawn``
from torchrun's environment, and ``--distributed-backend gloo`` with ``--cpu``
(or without a GPU) unless a backend is given.

Why not plain ``fairseq-train`` under torchrun: fairseq reads torchrun's
variables only when its own ``--distributed-world-size`` is above 1, and that
defaults to the GPUs of the node, so on CPU (or one GPU a node) every process
trains alone as rank 0 of a world of one, and they all write the same
checkpoint files; given ``--distributed-world-size`` by hand on CPU, it
computes the device as ``RANK % torch.cuda.device_count()`` and divides by
zero (``fairseq/distributed/utils.py``, ``infer_init_method``).
"""
import os
import sys

from ..errors import HashConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
OURS = ("--distributed-world-size", "--distributed-rank", "--device-id",
        "--distributed-init-method", "--distributed-no-spawn")


def _given(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in args)


def torchrun_flags(args, environ=os.environ, has_gpu=None):
    """fairseq-train's ``args`` with this process's place in torchrun's world added."""
    missing = [name for name in TORCHRUN_ENV if name not in environ]
    if missing:
        raise HashConfigError(
            f"fairseq_hash.cli.torchrun_train runs under torchrun ({', '.join(missing)} not "
            f"set); start it with torchrun ... -m fairseq_hash.cli.torchrun_train, or use "
            f"fairseq-train for one process")
    clash = [flag for flag in OURS if _given(args, flag)]
    if clash:
        raise HashConfigError(
            f"{clash[0]}: set from torchrun's environment by fairseq_hash.cli.torchrun_train; "
            f"leave it out (torchrun's --nnodes and --nproc-per-node give the world size)")
    extra = ["--distributed-world-size", environ["WORLD_SIZE"],
             "--distributed-rank", environ["RANK"],
             "--device-id", environ["LOCAL_RANK"],
             "--distributed-init-method", "env://", "--distributed-no-spawn"]
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    if not _given(args, "--distributed-backend") and ("--cpu" in args or not has_gpu):
        extra += ["--distributed-backend", "gloo"]
    return list(args) + extra


def main():
    sys.argv[1:] = torchrun_flags(sys.argv[1:])
    from fairseq_cli.train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
