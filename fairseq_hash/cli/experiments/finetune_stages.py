"""What both tasks of ``fairseq-hash-finetune`` share: the training flags and the starting point.

    args = [..., *common_args(cfg, cfg.lr, cfg.pretrain_updates)]   # fairseq-train's optimisation
    checkpoint, pretraining = starting_point(cfg, run_dir, dense_dir, "upcycled", tag,
                                             "masked-LM", ["--encoder-hash-layer"], pretrain_args)

A model's fine-tuning starts from its own pretrained checkpoint (``dense``,
``hash``), or from dense's pretrained checkpoint through
``fairseq-hash-upcycle`` (``upcycled``). The tasks are
finetune_classify.py and finetune_seq2seq.py.
"""
import os

from ..fairseq_runner import device_flags, run_fairseq

SPLITS = ("train", "valid", "test")


def common_args(cfg, lr, updates):
    """fairseq-train's optimisation, logging and checkpoint flags of every run of both tasks."""
    return ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
            "--lr", lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", cfg.warmup_updates,
            "--warmup-init-lr", "1e-07", "--max-update", updates, "--max-tokens", cfg.max_tokens,
            "--seed", cfg.seed, "--num-workers", "0", "--log-format", "json",
            "--log-interval", max(1, cfg.validate_every // 2),
            "--validate-interval-updates", cfg.validate_every,
            "--no-epoch-checkpoints", "--no-save-optimizer-state", *device_flags()]


def upcycle(cfg, dense_checkpoint, output, log_path, side_flags):
    """``fairseq-hash-upcycle`` the dense pretrained checkpoint; returns (ok, last line)."""
    if os.path.exists(output):
        os.remove(output)  # the tool refuses to overwrite; this run made it
    done = run_fairseq("fairseq-hash-upcycle", [
        dense_checkpoint, "--output", output, "--hash-experts", cfg.experts, "--hash-type",
        "balanced", "--hash-seed", "1", *[a for flag in side_flags for a in (flag, cfg.hash_layer)]],
        log_path)
    return done.ok and os.path.isfile(output), done.last_line()


def starting_point(cfg, run_dir, dense_dir, model, tag, objective, side_flags, pretrain_args):
    """The checkpoint a model's fine-tuning starts from, and its pretraining run.

    ``dense`` and ``hash`` pretrain in ``run_dir`` (``pretrain_args(save_dir)`` are
    fairseq-train's arguments); ``upcycled`` is the checkpoint dense pretrained in
    ``dense_dir`` through ``fairseq-hash-upcycle`` with ``side_flags`` set to
    ``--hash-layer``, and has no pretraining run. The checkpoint is None on failure,
    which is printed.
    """
    if model == "upcycled":
        dense = os.path.join(dense_dir, "pretrain", "checkpoint_last.pt")
        checkpoint = os.path.join(run_dir, "upcycled.pt")
        print(f"{tag} fairseq-hash-upcycle of the dense pretrained model", flush=True)
        ok, last = (upcycle(cfg, dense, checkpoint, os.path.join(run_dir, "upcycle.log"), side_flags)
                    if os.path.isfile(dense) else (False, f"no dense checkpoint {dense}"))
        if not ok:
            print(f"{tag} upcycling failed: {last}", flush=True)
        return (checkpoint if ok else None), None
    pre_dir = os.path.join(run_dir, "pretrain")
    print(f"{tag} {objective} pretraining, {cfg.pretrain_updates} updates", flush=True)
    pre = run_fairseq("fairseq-train", pretrain_args(pre_dir), os.path.join(run_dir, "pretrain.log"))
    checkpoint = os.path.join(pre_dir, "checkpoint_last.pt")
    if not pre.ok or not os.path.exists(checkpoint):
        print(f"{tag} pretraining failed: {pre.last_line()}; see {pre.log_path}", flush=True)
        return None, pre
    return checkpoint, pre
