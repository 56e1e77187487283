"""``fairseq-hash-consolidate``: one file from a sharded expert-parallel checkpoint.

    fairseq-hash-consolidate checkpoints/checkpoint_last.pt --output whole.pt

An expert-parallel run saves each rank's experts in shard files beside
fairseq's checkpoint (docs/several-workers.md). Every fairseq tool reads such a
set as it is; this writes the one-file checkpoint a single process would have
written (every expert's weights and optimizer state in ``[K, ...]`` stacks), for
copying elsewhere or for programs that read checkpoints with ``torch.load``.
The process holds the whole model once, as one process evaluating it does.
"""
import argparse
import os
import sys

from .command import command


def consolidate(path: str, output: str) -> dict:
    """Write ``output``, the one-file form of the checkpoint ``path``; returns its state."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_hash  # noqa: F401  (allows fairseq's checkpoint types)
    from fairseq_hash import expert_shards
    from fairseq_hash.errors import HashConfigError

    if os.path.exists(output):
        raise HashConfigError(f"--output {output} exists; give a new path (nothing is overwritten)")
    if not os.path.isfile(path):
        raise HashConfigError(f"{path}: no such checkpoint")
    # as fairseq wrote it (no upgrade, no omegaconf objects), its tensors mapped
    state = torch.load(path, map_location="cpu", mmap=True)
    if expert_shards.INDEX not in state:
        raise HashConfigError(f"{path}: already one file (it names no expert shards)")
    state = expert_shards.consolidated(expert_shards.resolve_shards(state, path))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # fairseq's own write: OUTPUT.tmp renamed when whole
    checkpoint_utils.torch_persistent_save(state, output)
    return state


@command("fairseq-hash-consolidate")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-consolidate",
                                     description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("checkpoint", metavar="CHECKPOINT.pt",
                        help="fairseq's file of a sharded checkpoint (its shards beside it)")
    parser.add_argument("--output", required=True, metavar="WHOLE.pt",
                        help="where to write the one-file checkpoint (must not exist)")
    args = parser.parse_args(argv)
    consolidate(args.checkpoint, args.output)
    print(args.output)


if __name__ == "__main__":
    sys.exit(main())
