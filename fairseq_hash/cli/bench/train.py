"""Train mode of ``fairseq-hash-bench --train``: whole models through ``fairseq-train``.

    rows = run_train(args, torch.device("cpu"))    # args from bench.parse_args
    print_train_table(rows)

Train mode (``--train``) runs ``fairseq-train`` on a small language-modelling
data-bin (``--data-bin``, or one built by ``fairseq-hash-prepare`` in
``--work-dir``) for the same model with and without a hash layer (the last
layer; one run per K), and with each learned router (``--router``;
``--impls`` chooses among them), with each ``--optimizer``
(fairseq's ``adam``, this project's ``fused_adamw``), and reports fairseq's training words per second: the
median over the timed updates of a run, then over ``--repeat`` rounds;
``x dense`` is the median over rounds of the ratio to the dense run of the
same round (runs of a round follow each other, in an order that rotates).
"""
import logging
import os
import statistics
import sys
from typing import List

from ...errors import HashConfigError
from ..fairseq_runner import run_fairseq
from ..user_dir import user_dir
from .layer_cases import LAYER_IMPLS, LEARNED_ROUTERS
from .options import prepared_data

logger = logging.getLogger("fairseq_hash.bench")


# ----------------------------------------------------------------------------
# Train mode: whole models through fairseq-train


def train_models(experts: List[int], impls=LAYER_IMPLS):
    """(label, K, extra fairseq-train arguments) of each model to train; dense first."""
    models = [("dense", 0, ["--arch", "transformer_lm"])]
    if "hash" in impls:
        for K in experts:
            models.append(("hash", K, ["--arch", "hash_transformer_lm", "--hash-layer", "-1",
                                       "--hash-experts", str(K), "--hash-type", "balanced"]))
    for name in LEARNED_ROUTERS:
        if name in impls:
            for K in experts:
                models.append((name, K, ["--arch", "hash_transformer_lm", "--hash-layer", "-1",
                                         "--hash-experts", str(K), "--router", name,
                                         "--criterion", "moe_cross_entropy"]))
    return models


def fairseq_train_speed(data_bin, extra, args, device, log_path):
    """Run fairseq-train; return (median words/s, median ms/update, peak RSS MB)."""
    train = run_fairseq("fairseq-train", [
        data_bin, "--user-dir", user_dir(),
        "--task", "language_modeling", "--decoder-layers", args.layers,
        "--decoder-embed-dim", args.embed_dim,
        "--decoder-ffn-embed-dim", args.ffn_dim, "--decoder-attention-heads", "8",
        "--tokens-per-sample", min(512, args.train_tokens),
        "--max-tokens", args.train_tokens,
        "--max-update", args.updates, "--lr", "0.0005",
        "--no-save", "--save-dir", os.path.join(args.work_dir, "checkpoints"),
        "--disable-validation", "--log-format", "json", "--log-interval", "1",
        "--seed", "1", "--num-workers", "0", *extra, *(["--cpu"] if device.type == "cpu" else [])],
        log_path, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    train.checked(" ".join(extra))
    timed = [r for r in train.records("train_inner")
             if r["num_updates"] > args.warmup_updates and r["wps"] > 0]
    if not timed:
        raise HashConfigError(f"no timed updates in {log_path}: raise --updates above "
                           f"--warmup-updates ({args.warmup_updates})")
    return (statistics.median(r["wps"] for r in timed),
            statistics.median(1000.0 * r["wpb"] / r["wps"] for r in timed), train.peak_rss_mb)


def run_train(args, device) -> List[dict]:
    data_bin = prepared_data(args)
    models = train_models(args.experts, args.impls)
    runs = [(label, K, extra + ["--optimizer", optimizer], optimizer)
            for optimizer in args.optimizer for label, K, extra in models]
    results = {i: [] for i in range(len(runs))}
    for r in range(args.repeat):
        order = list(range(len(runs)))
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:  # alternate who runs first
            label, K, extra, optimizer = runs[i]
            log_path = os.path.join(args.work_dir, f"train-{label}-{K}-{optimizer}-round{r}.log")
            logger.info(f"round {r + 1}/{args.repeat}: fairseq-train {label} experts {K} "
                        f"--optimizer {optimizer}")
            results[i].append(fairseq_train_speed(data_bin, extra, args, device, log_path))
    dense_run = {optimizer: i for i, (label, _, _, optimizer) in enumerate(runs)
                 if label == "dense"}
    rows = []
    for i, (label, K, _, optimizer) in enumerate(runs):
        dense = results[dense_run[optimizer]]
        wps = statistics.median(x[0] for x in results[i])
        ms = statistics.median(x[1] for x in results[i])
        peak = max(x[2] for x in results[i])
        # the load of a shared machine drifts between rounds: compare each run
        # with the dense run (same optimizer) of its own round, then take the median
        ratio = statistics.median(x[0] / d[0] for x, d in zip(results[i], dense))
        rows.append(dict(impl=f"train-{label}", experts=K, tokens=args.train_tokens,
                         optimizer=optimizer, ms=round(ms, 1), peak_mb=round(peak, 1),
                         wps=round(wps, 1), x_dense=round(ratio, 3),
                         rounds_wps=[round(x[0], 1) for x in results[i]]))
    return rows


def print_train_table(rows, out=sys.stdout):
    print(f"{'model':<14} {'experts':>7} {'tokens':>7} {'optimizer':>11} {'words/s':>9} "
          f"{'ms/update':>10} {'x dense wps':>11} {'peak_mb':>8}  words/s of each round", file=out)
    for row in rows:
        print(f"{row['impl']:<14} {row['experts']:>7} {row['tokens']:>7} {row['optimizer']:>11} "
              f"{row['wps']:9.1f} "
              f"{row['ms']:10.1f} {row['x_dense']:11.3f} {row['peak_mb']:8.1f}  "
              f"{' '.join(str(w) for w in row['rounds_wps'])}", file=out)
