"""fairseq-train as one process of a torchrun launch, on CPU or GPU, one node or several.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr HOST --master-port 29500 \\
        -m fairseq_hash.cli.torchrun_train data-bin --user-dir $(fairseq-hash-user-dir) \\
        --arch hash_transformer_lm ... [--cpu --ddp-backend legacy_ddp]

Every process gets fairseq-train's flags as given, plus the ones that tell it
its place: ``--distributed-world-size $WORLD_SIZE --distributed-rank $RANK
--device-id $LOCAL_RANK --distributed-init-method env:// --distributed-no-spawn``
from torchrun's environment. With ``--cpu`` (or without a GPU) also
``--distributed-backend gloo`` unless a backend is given, and ``--ddp-backend
legacy_ddp`` unless one is given (fairseq's default, pytorch_ddp, needs GPUs;
given on CPU, it is refused). A refusal of the plugin is one line, printed by
rank 0 (every rank refuses the same flags); torchrun's summary of the failed
workers follows it. Each attempt of the group gets a TCPStore of its own
(:func:`store_of_its_own`), so that ``--max-restarts`` restarts a group that
lost a worker.

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
    return _value(args, flag) is not None


def _value(args, flag):
    """The value ``args`` give ``flag`` (the last one, as argparse takes it), or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag:
            value = args[i + 1] if i + 1 < len(args) else ""
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


# fairseq's pytorch_ddp (its default, alias c10d) hands DistributedDataParallel
# device_ids=[--device-id], which torch refuses for a model on the CPU
ON_CPU = "on CPU: --ddp-backend legacy_ddp (fairseq's default, pytorch_ddp, needs GPUs)"


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
    on_cpu = "--cpu" in args or not has_gpu
    if on_cpu and not _given(args, "--distributed-backend"):
        extra += ["--distributed-backend", "gloo"]
    ddp = _value(args, "--ddp-backend")
    if on_cpu and ddp in ("pytorch_ddp", "c10d"):
        raise HashConfigError(f"--ddp-backend {ddp} needs GPUs (fairseq gives torch's "
                              f"DistributedDataParallel a device id); on CPU use legacy_ddp")
    if on_cpu and ddp is None:
        extra += ["--ddp-backend", "legacy_ddp"]
    return list(args) + extra


def store_of_its_own(environ) -> dict:
    """The variables that give this attempt of the group a TCPStore of its own.

    torchrun shares its agent's store with ``init_process_group``
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and a group it restarts after a
    lost worker reads the previous attempt's peer addresses from it: gloo's
    ``connectFullMesh`` then fails (Connection refused) or hangs (pytorch
    #135712, #167288; DESIGN.md has the counts). Rank 0 instead hosts a fresh
    store at ``MASTER_PORT + 1 + TORCHELASTIC_RESTART_COUNT``, a port per
    attempt, the same on every node (it must be free on the master node).
    """
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return {"TORCHELASTIC_USE_AGENT_STORE": "False",
            "MASTER_PORT": str(int(environ["MASTER_PORT"]) + 1 + attempt)}


def main():
    args = torchrun_flags(sys.argv[1:])
    os.environ.update(store_of_its_own(os.environ))
    if not _given(sys.argv[1:], "--ddp-backend") and _given(args, "--ddp-backend"):
        if os.environ["RANK"] == "0":
            print(f"fairseq_hash.cli.torchrun_train: {ON_CPU}", file=sys.stderr)
    sys.argv[1:] = args
    from fairseq_cli.train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
