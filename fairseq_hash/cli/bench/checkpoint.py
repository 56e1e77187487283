"""Memory a sharded checkpoint adds to each rank: a save and a resume, on W gloo ranks.

    python -m fairseq_hash.cli.bench.checkpoint                 # 2 and 4 ranks, K=16
    python -m fairseq_hash.cli.bench.checkpoint --ranks 2 --json ckpt-memory.json

For each world size W, ``fairseq-train`` runs on W gloo processes (launched by
hand, as docs/several-workers.md shows) a hash LM whose hash layers hold most of
the parameters (default: K=16 experts of d=256, f=2048 in two hash layers,
P=W), saves after 2 updates, and a second run resumes that checkpoint and
saves again after one more update. Each process wraps fairseq's
``checkpoint_utils.save_checkpoint`` and ``load_checkpoint`` and records:

- **share**: the bytes of the expert weights this rank holds and of their
  optimizer state (Adam's two moments), after the call;
- **added by save / resume**: the peak resident memory during the call
  minus the resident memory just before it (for a resume: fairseq's
  ``Trainer.load_checkpoint`` and the optimizer rows read after it, not the
  training data fairseq loads in between). The kernel's peak (``VmHWM`` of
  ``/proc/self/status``) is reset to the current resident size before each
  call by writing 5 to ``/proc/self/clear_refs`` (Linux 4.0+), so each call
  is measured alone and the numbers can be rerun. It counts everything the
  process touches: tensors, the file pages of memory-mapped shards, Python.

A resume creates the optimizer's moments (2/3 of the share with Adam) and
loads fairseq's own file (the shared weights); a save should add little more
than serialisation buffers (goal: at most about 1.2x the share).
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

from ..user_dir import user_dir
from .options import add_data_flags, add_json_flag, prepared_data, write_json
from .parallel import free_port

SELF = [sys.executable, "-m", "fairseq_hash.cli.bench.checkpoint"]


def memory(field: str) -> int:
    """Bytes of ``VmRSS`` or ``VmHWM`` (peak) of this process."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def share_bytes(trainer) -> int:
    """Bytes of this rank's expert weights and their optimizer state."""
    import torch

    from fairseq_hash.distributed_checkpoints import expert_parameters, optimizer_state

    state, keyed_by, _ = optimizer_state(trainer)
    total = 0
    for _, p, _, _ in expert_parameters(trainer.get_model(), spread_only=False):
        total += p.nbytes + sum(v.nbytes for v in state.get(keyed_by(p), {}).values()
                                if torch.is_tensor(v))
    return total


def record(out, call, added, trainer):
    with open(out, "a") as f:
        f.write(json.dumps({"call": call, "added": added, "share": share_bytes(trainer)}) + "\n")


def metered_save(save, out):
    @functools.wraps(save)
    def call(cfg, trainer, *args, **kwargs):
        reset_peak()
        before = memory("VmRSS")
        result = save(cfg, trainer, *args, **kwargs)
        record(out, "save", memory("VmHWM") - before, trainer)
        return result
    return call


def metered_resume(out):
    """Meter fairseq's ``Trainer.load_checkpoint`` (its file, the model's rows)
    and the optimizer rows read after it, leaving out what fairseq does in
    between (loading the training data)."""
    from fairseq.trainer import Trainer

    from fairseq_hash import distributed_checkpoints

    load, rows, seen = Trainer.load_checkpoint, distributed_checkpoints.keep_own_optimizer_rows, {}

    @functools.wraps(load)
    def trainer_load(self, *args, **kwargs):
        reset_peak()
        before = memory("VmRSS")
        result = load(self, *args, **kwargs)
        seen.update(peak=memory("VmHWM") - before, kept=memory("VmRSS") - before)
        return result

    @functools.wraps(rows)
    def own_rows(trainer):
        reset_peak()
        before = memory("VmRSS")
        rows(trainer)
        added = max(seen["peak"], seen["kept"] + memory("VmHWM") - before)
        record(out, "resume", added, trainer)

    Trainer.load_checkpoint = trainer_load
    distributed_checkpoints.keep_own_optimizer_rows = own_rows


def rank_main(out, argv):
    """One rank: fairseq-train with metered checkpoint calls."""
    from fairseq import checkpoint_utils
    from fairseq_cli import train

    import fairseq_hash  # noqa: F401  (installs the loading wrappers)
    from fairseq_hash.distributed_checkpoints import install_checkpoint_wrappers

    install_checkpoint_wrappers()  # now, so that the meters wrap them
    checkpoint_utils.save_checkpoint = metered_save(checkpoint_utils.save_checkpoint, out)
    metered_resume(out)
    sys.argv = ["fairseq-train", *argv]
    train.cli_main()


def train_on_ranks(args, world, save_dir, updates, out):

    layers = ",".join(str(i) for i in range(args.hash_layers))
    base = [args.data_bin, "--user-dir", user_dir(), "--task", "language_modeling",
            "--arch", "hash_transformer_lm", "--decoder-layers", str(args.hash_layers),
            "--decoder-embed-dim", str(args.embed_dim),
            "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-attention-heads", "4",
            "--hash-layer", layers, "--hash-experts", str(args.experts),
            "--tokens-per-sample", "64", "--max-tokens", "256", "--optimizer", "adam",
            "--lr", "0.0005", "--max-update", str(updates), "--cpu", "--num-workers", "0",
            "--disable-validation", "--no-epoch-checkpoints", "--save-dir", save_dir,
            "--distributed-world-size", str(world), "--distributed-backend", "gloo",
            "--ddp-backend", "legacy_ddp", "--distributed-no-spawn",
            "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([*SELF, "_rank", f"{out}.{rank}", *base,
                               "--distributed-rank", str(rank)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench.checkpoint: fairseq-train on {world} ranks failed:\n"
                         + errors[0][-3000:])


def measure(args, world) -> list:
    work = tempfile.mkdtemp(prefix=f"ckpt-memory-{world}-", dir=args.work_dir)
    save, out = os.path.join(work, "checkpoints"), os.path.join(work, "memory")
    train_on_ranks(args, world, save, 2, out)  # saves once, at update 2
    train_on_ranks(args, world, save, 3, out)  # resumes, saves at update 3
    rows = []
    for rank in range(world):
        calls = [json.loads(line) for line in open(f"{out}.{rank}")]
        save_calls = [c for c in calls if c["call"] == "save"]
        resume = [c for c in calls if c["call"] == "resume"][-1]
        rows.append({"ranks": world, "rank": rank, "experts": args.experts,
                     "share_mb": save_calls[0]["share"] / 2**20,
                     "save_added_mb": [c["added"] / 2**20 for c in save_calls],
                     "resume_added_mb": resume["added"] / 2**20})
    return rows


def print_table(rows):
    print("| ranks | rank | share: experts + Adam (MB) | added by a save (MB) | save / share "
          "| added by a resume (MB) | resume / share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        save = max(r["save_added_mb"])
        print(f"| {r['ranks']} | {r['rank']} | {r['share_mb']:.0f} | {save:.0f} | "
              f"{save / r['share_mb']:.2f} | {r['resume_added_mb']:.0f} | "
              f"{r['resume_added_mb'] / r['share_mb']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_hash.cli.bench.checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="world sizes to measure, gloo processes on this machine "
                        "(default 2 4)")
    parser.add_argument("--experts", type=int, default=16, help="experts K of each hash layer (default 16)")
    parser.add_argument("--embed-dim", type=int, default=256, help="model width d (default 256)")
    parser.add_argument("--ffn-dim", type=int, default=2048, help="hidden width f of every expert (default 2048)")
    parser.add_argument("--hash-layers", type=int, default=2,
                        help="decoder layers, all hash layers (default 2)")
    add_data_flags(parser)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    for world in args.ranks:
        if world < 2 or args.experts % world:
            parser.error(f"--ranks {world}: give world sizes of 2 or more that divide "
                         f"--experts {args.experts}")
    args.data_bin = prepared_data(args)
    rows = [row for world in args.ranks for row in measure(args, world)]
    print_table(rows)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["_rank"]:
        rank_main(sys.argv[2], sys.argv[3:])
    else:
        main()
