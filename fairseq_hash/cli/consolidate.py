"""``fairseq-hash-consolidate``: one file from a sharded expert-parallel checkpoint.

    fairseq-hash-consolidate checkpoints/checkpoint_last.pt --output whole.pt

An expert-parallel run saves each rank's experts in shard files beside
fairseq's checkpoint (docs/several-workers.md). Every fairseq tool reads such a
set as it is; this writes the one-file checkpoint a single process would have
written (every expert's weights and optimizer state in ``[K, ...]`` stacks), for
copying elsewhere or for programs that read checkpoints with ``torch.load``.
The process holds the whole model once, as one process evaluating it does.

    fairseq-hash-consolidate checkpoints/checkpoint_last.pt --ema --output ema.pt

With ``--ema`` the output's model is the moving average of the weights that
``fairseq-train --store-ema`` kept (its fp32 copy with ``--ema-fp32``), as
fairseq's ``checkpoint_utils.save_ema_as_checkpoint`` writes it, for
fairseq-eval-lm and fairseq-generate to score; a one-file checkpoint is taken
as it is.
"""
import argparse
import os
import sys

from .command import command


def consolidate(path: str, output: str, ema: bool = False) -> dict:
    """Write ``output``, the one-file form of the checkpoint ``path`` (its model the
    EMA weights with ``ema``); returns its state."""
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
    if expert_shards.INDEX in state:
        state = expert_shards.consolidated(expert_shards.resolve_shards(state, path))
    elif not ema:
        raise HashConfigError(f"{path}: already one file (it names no expert shards)")
    if ema:
        extra = state.get("extra_state") or {}
        if "ema" not in extra:
            raise HashConfigError(f"--ema: {path} holds no EMA weights (fairseq-train saves "
                                  f"them with --store-ema)")
        # the fp32 copy is the average itself, "ema" its copy in the model's dtype
        state["model"] = dict(extra.get("ema_fp32_params") or extra["ema"])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # fairseq's own write: OUTPUT.tmp renamed when whole
    checkpoint_utils.torch_persistent_save(state, output)
    return state


@command("fairseq-hash-consolidate")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-consolidate",
                                     description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("checkpoint", metavar="CHECKPOINT.pt",
                        help="fairseq's file of a sharded checkpoint (its shards beside it), "
                             "or with --ema any checkpoint")
    parser.add_argument("--output", required=True, metavar="WHOLE.pt",
                        help="where to write the one-file checkpoint (must not exist)")
    parser.add_argument("--ema", action="store_true",
                        help="write the moving average of the weights that --store-ema kept "
                             "as the model (one-file checkpoints too)")
    args = parser.parse_args(argv)
    consolidate(args.checkpoint, args.output, args.ema)
    print(args.output)


if __name__ == "__main__":
    sys.exit(main())
