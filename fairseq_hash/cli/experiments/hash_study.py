"""The paper's hash study, rerunnable: one small LM per hash type, same settings.

    run/hash_study.sh                           # built-in corpus, about 30 minutes on 2 cores
    run/hash_study.sh a.txt b.txt --updates 2000 --experts 16
    run/hash_study.sh --quick                   # a smoke test of a few minutes

Trains, with identical data, seed and settings: the model with no hash layer
(``transformer_lm``), then ``hash_transformer_lm`` with each hash type, MultiHash
(balanced, ``--hash-count``), balanced top-2 (``--hash-topk 2 --hash-score
softmax``) and the ``future`` oracle. ``clustered`` and
``dispersed`` tables come from k-means over the no-hash model's input
embeddings (``fairseq-hash-table``). Each model is evaluated (its last
checkpoint, every token of valid and test); the load of its hash layers is
measured on valid. With ``--seeds N`` every row trains N times (seeds
``--seed`` to ``--seed`` + N - 1; clustered and dispersed from the dense model
of the same seed) and the table gives each number's mean and standard
deviation. Training runs on the GPU when torch sees one. Writes
``WORK/results.md`` (the table, also printed), ``results.json``,
``valid_ppl.png`` (validation perplexity over updates) and, per run,
``runs/NAME/seedS/``. A run whose checkpoint exists is not trained again, so
an interrupted study resumes where it stopped.
"""
import argparse
import json
import logging
import math
import os
import sys
import time

from ...errors import HashConfigError
from ..command import command
from ..fairseq_runner import device_flags, read_log, run_fairseq
from ..user_dir import user_dir
from .results import (figure, format_spread, markdown_table, over_seeds, plot_spread, seed_list,
                      write_json)

logger = logging.getLogger("fairseq_hash.hash_study")

# rows in the paper's order of quality (balanced ~ random > dispersed > clustered,
# bigram, previous, position); the oracle last
HASH_RUNS = ["balanced", "random", "multihash", "top2", "dispersed", "clustered", "bigram",
             "previous", "position", "future"]
QUICK = dict(updates=30, validate_every=10, embed_dim=32, ffn_dim=64, max_tokens=1024,
             max_lines=1500, vocab_size=500, experts=4, warmup=5)


def model_flags(a):
    return ["--decoder-layers", a.layers, "--decoder-embed-dim", a.embed_dim,
            "--decoder-ffn-embed-dim", a.ffn_dim, "--decoder-attention-heads", a.heads,
            "--tokens-per-sample", a.tokens_per_sample, "--dropout", a.dropout]


def train_flags(a, seed):
    return ["--task", "language_modeling", "--max-tokens", a.max_tokens,
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", a.lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", a.warmup,
            "--warmup-init-lr", "1e-07", "--clip-norm", "1.0", "--max-update", a.updates,
            "--validate-interval-updates", a.validate_every, "--seed", seed, *device_flags(),
            "--num-workers", "0", "--log-format", "json", "--log-interval", a.validate_every,
            "--no-epoch-checkpoints", "--no-save-optimizer-state"]


def run_flags(name, a, tables):
    """Model flags of one row of the study."""
    if name == "dense":
        return ["--arch", "transformer_lm"]
    hash_type = "balanced" if name in ("multihash", "top2") else name
    flags = ["--arch", "hash_transformer_lm", "--user-dir", user_dir(), "--hash-type", hash_type,
             "--hash-experts", a.experts, "--hash-layer", a.hash_layer]
    if name == "multihash":
        flags += ["--hash-count", a.hash_count]
    if name == "top2":
        flags += ["--hash-topk", 2, "--hash-score", "softmax"]
    if name in tables:
        flags += ["--hash-file", tables[name]]
    return flags


def train(name, seed, data, a, tables):
    """Train one row with one seed (unless it was trained with these very flags); its folder."""
    folder = os.path.join(a.work_dir, "runs", name, f"seed{seed}")
    ckpt = os.path.join(folder, "checkpoint_last.pt")
    log = os.path.join(folder, "train.log")
    args = [str(x) for x in [data, *run_flags(name, a, tables), *model_flags(a),
                             *train_flags(a, seed), "--save-dir", folder]]
    stamp = os.path.join(folder, "argv.json")
    if os.path.isfile(ckpt) and os.path.isfile(log) and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == args:
                logger.info(f"{name} seed {seed}: reusing {ckpt}")
                return folder
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        if old.endswith(".pt"):
            os.remove(os.path.join(folder, old))  # else fairseq-train would resume from it
    logger.info(f"{name} seed {seed}: training {a.updates} updates")
    start = time.time()
    # the log keeps its final name only once training succeeded: a rerun retrains
    run_fairseq("fairseq-train", args, log + ".tmp").checked(f"of {name}")
    os.replace(log + ".tmp", log)
    with open(os.path.join(folder, "wall_seconds"), "w") as f:
        f.write(f"{time.time() - start:.1f}\n")
    with open(stamp, "w") as f:
        json.dump(args, f)
    return folder


def evaluate(name, seed, folder, data, a):
    """Valid/test perplexity of the last checkpoint and the valid load of its hash layers."""
    from fairseq import checkpoint_utils

    from ..report import collect, layer_report

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(folder, "checkpoint_last.pt")], arg_overrides={"data": data})
    model = models[0].eval()
    if not hasattr(model.decoder, "moe_layers"):
        model.decoder.moe_layers = {}  # the model without hash layers
    tokens, experts, valid_nll = collect(model, task, "valid", a.max_tokens * 2)
    _, _, test_nll = collect(model, task, "test", a.max_tokens * 2)
    loads = [layer_report(moe, tokens, experts[idx], task.dictionary, 5)
             for idx, moe in model.decoder.moe_layers.items()]
    with open(os.path.join(folder, "wall_seconds")) as f:
        wall = float(f.read())
    log = read_log("fairseq-train", os.path.join(folder, "train.log"))
    return {
        "run": name,
        "seed": seed,
        "valid_ppl": math.exp(valid_nll),
        "test_ppl": math.exp(test_nll),
        "load_max_over_mean": max((l["max_over_mean"] for l in loads), default=None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": wall,
        "valid_curve": [(int(r["valid_num_updates"]), r["valid_ppl"]) for r in log.records("valid")],
    }


def aggregate(evaluated):
    """One row per run name: its seeds' numbers as mean and standard deviation."""
    return over_seeds(evaluated, "run", ["parameters"],
                      ("valid_ppl", "test_ppl", "load_max_over_mean", "train_seconds"), "valid_curve")


def build_tables(data, dense_folder, seed, a):
    """clustered/dispersed table files from the no-hash model's embeddings (of one seed)."""
    from ..hash_table import make_table

    tables = {}
    for kind in ("clustered", "dispersed"):
        path = os.path.join(a.work_dir, "tables", f"{kind}-{a.experts}-seed{seed}.json")
        if not os.path.isfile(path):
            make_table([kind, "--checkpoint", os.path.join(dense_folder, "checkpoint_last.pt"),
                        "--data", data, "--experts", str(a.experts), "--output", path,
                        "--seed", str(seed)])
        tables[kind] = path
    return tables


LABELS = {"dense": "no hash layer (transformer_lm)", "multihash": "MultiHash (balanced, N={n})",
          "top2": "balanced, top-2 experts (softmax scores)",
          "future": "future (oracle: sees the label)"}


def markdown(rows, a):
    lines = markdown_table(
        ["hash", "valid ppl", "test ppl", "load max/mean (valid)", "params", "train s"],
        [[LABELS.get(r["run"], r["run"]).format(n=a.hash_count),
          format_spread(r["valid_ppl"], r["valid_ppl_sd"]),
          format_spread(r["test_ppl"], r["test_ppl_sd"]),
          format_spread(r["load_max_over_mean"], r["load_max_over_mean_sd"]),
          f"{r['parameters']:,}", f"{r['train_seconds']:.0f}"] for r in rows])
    seeds = seed_list(a.seed, a.seeds)
    settings = (f"{a.layers} layers, d={a.embed_dim}, f={a.ffn_dim}, K={a.experts} experts at "
                f"layer {a.hash_layer}, {a.updates} updates of {a.max_tokens} tokens, "
                f"blocks of {a.tokens_per_sample}, lr {a.lr}, seed{'s' * (len(seeds) > 1)} "
                f"{', '.join(map(str, seeds))}")
    spread = (f"Each number is the mean over {len(seeds)} seeds ± their sample standard "
              "deviation (train s: the mean).\n\n" if len(seeds) > 1 else "")
    return "\n".join(lines) + f"\n\n{spread}Settings: {settings}.\n"


def plot(rows, path):
    """Validation perplexity over updates; right: relative to the run with no hash layer."""
    with figure(path, 2, dpi=100) as (left, right):
        for r in rows:
            style = dict(marker=".", label=r["run"], linestyle="--" if r["run"] == "future" else "-")
            line = plot_spread(left, r["valid_curve"], **style)
            if line is not None and r["run"] not in ("dense", "future"):
                plot_spread(right, r["relative_curve"], color=line.get_color(), **style)
        seeds = max((len(r["seeds"]) for r in rows), default=1)
        left.set_yscale("log")
        left.set_title("validation perplexity" + (f", mean of {seeds} seeds ± sd" if seeds > 1 else ""))
        right.axhline(1.0, color="black", linewidth=1, label="no hash layer")
        right.set_title("relative to no hash layer, same seed (the oracle left out)")
        for ax in (left, right):
            ax.set_xlabel("updates")
            ax.legend(fontsize=7)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fairseq-hash-study", description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="*", help="plain text files, one paragraph a line (default: "
                   "the built-in corpus of Python docstrings)")
    p.add_argument("--work-dir", default=None,
                   help="folder for data, runs, results.md (default outputs/hash_study, "
                   "or outputs/hash_study_quick with --quick); runs trained there with the "
                   "same flags are reused")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test size: 30 updates, d=32, 1500 lines, K=4 (a few minutes)")
    p.add_argument("--runs", default=",".join(["dense"] + HASH_RUNS),
                   help="comma-separated rows to run: dense and any of " + ", ".join(HASH_RUNS)
                   + " (default all; clustered/dispersed need dense)")
    p.add_argument("--updates", type=int, default=300, help="updates per model (default 300)")
    p.add_argument("--validate-every", type=int, default=50,
                   help="updates between validations, the points of the plot (default 50)")
    p.add_argument("--experts", type=int, default=8, help="experts K of the hash layer (default 8)")
    p.add_argument("--hash-layer", default="-1", help="which layers hash, as --hash-layer (default -1)")
    p.add_argument("--hash-count", type=int, default=2, help="N of the MultiHash row (default 2)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--embed-dim", type=int, default=64, help="model width d (default 64)")
    p.add_argument("--ffn-dim", type=int, default=256, help="FFN width f (default 256)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--tokens-per-sample", type=int, default=64, help="block length (default 64)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    p.add_argument("--lr", type=float, default=0.003, help="peak learning rate (default 0.003)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up updates (default 30)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout probability of every model (default 0.1)")
    p.add_argument("--seed", type=int, default=1, help="seed of every run (default 1)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every row with this many seeds, --seed, --seed + 1, ...; the "
                   "table shows each number's mean and standard deviation (default 1)")
    p.add_argument("--vocab-size", type=int, default=2000, help="sentencepiece vocabulary (default 2000)")
    p.add_argument("--max-lines", type=int, default=0, help="use at most this many lines of text "
                   "(default 0: all)")
    a = p.parse_args(argv)
    if a.quick:
        for key, value in QUICK.items():
            if p.get_default(key) == getattr(a, key):
                setattr(a, key, value)
    a.work_dir = a.work_dir or ("outputs/hash_study_quick" if a.quick else "outputs/hash_study")
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in ["dense"] + HASH_RUNS]
    if bad:
        p.error(f"--runs {','.join(bad)}: unknown; valid: dense, {', '.join(HASH_RUNS)}")
    if ("clustered" in runs or "dispersed" in runs) and "dense" not in runs:
        p.error("--runs: clustered and dispersed cluster the embeddings of the dense run; add dense")
    if a.ffn_dim % a.hash_count:
        p.error(f"--hash-count {a.hash_count} must divide --ffn-dim {a.ffn_dim}")
    for name in ("updates", "validate_every", "experts", "layers", "max_tokens", "seeds"):
        if getattr(a, name) < 1 or (name == "experts" and a.experts < 2):
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: too small")
    a.runs = runs
    return a


@command("fairseq-hash-study")
def main(argv=None):
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    for noisy in ("fairseq", "fairseq_hash.models", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..data.prepare import prepare

    os.makedirs(a.work_dir, exist_ok=True)
    data = prepare(os.path.join(a.work_dir, "data"), a.text or None, a.vocab_size,
                   max_lines=a.max_lines)
    evaluated = []
    for seed in seed_list(a.seed, a.seeds):
        folders, tables = {}, {}
        if "dense" in a.runs:
            folders["dense"] = train("dense", seed, data, a, tables)
            if "clustered" in a.runs or "dispersed" in a.runs:
                tables = build_tables(data, folders["dense"], seed, a)
        for name in HASH_RUNS:
            if name in a.runs:
                folders[name] = train(name, seed, data, a, tables)
        for name, folder in folders.items():
            try:
                evaluated.append(evaluate(name, seed, folder, data, a))
            except HashConfigError as e:
                raise HashConfigError(f"evaluating {name}: {e}") from None
            logger.info(f"{name} seed {seed}: valid ppl {evaluated[-1]['valid_ppl']:.2f}, "
                        f"test ppl {evaluated[-1]['test_ppl']:.2f}")
    rows = aggregate(evaluated)
    table = markdown(rows, a)
    with open(os.path.join(a.work_dir, "results.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(a.work_dir, "results.json"),
               {"settings": vars(a), "rows": rows, "runs": evaluated})
    plot(rows, os.path.join(a.work_dir, "valid_ppl.png"))
    print(table)
    print(f"written: {os.path.join(a.work_dir, 'results.md')}, valid_ppl.png, results.json")


if __name__ == "__main__":
    sys.exit(main())
