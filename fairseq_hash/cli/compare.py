"""``fairseq-hash-compare``: train dense, hash and learned-routing LMs alike; tabulate.

    fairseq-hash-compare --output-dir work/compare --preset tiny      # < 3 min on 2 cores
    fairseq-hash-compare --output-dir work/compare                    # ~30 min on 2 cores
    fairseq-hash-compare --output-dir out --text a.txt --models hash,switch --experts 4,16

Every model is fairseq's ``transformer_lm`` with the same dimensions, seed,
data order, batches, updates and learning rate; the routed ones
(``hash_transformer_lm``) differ only in how the FFN of the ``--hash-layer``
layers routes tokens over the same K experts: ``hash`` (balanced hash),
``hash-random``, ``switch``, ``top2``, ``base``, ``hash-top2`` (two hashed
experts a token, weighed by a learned softmax gate) and ``hash-shared`` (one
hashed and one shared expert of half the FFN's width each, so a token's
compute is the dense FFN's). ``dense`` keeps the plain FFN.
Each run is a ``fairseq-train`` process followed by ``fairseq-eval-lm`` on the
valid and test splits; their logs stay in ``OUTPUT/runs/NAME/seedS/``. With
``--seeds N`` every model trains N times (seeds ``--seed`` to ``--seed`` + N - 1)
and the tables give each number's mean and standard deviation. The results go
to ``OUTPUT/results.md``, ``OUTPUT/results.json`` and ``OUTPUT/curves.png``.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

from .fairseq_runner import device_flags, json_record, run_fairseq
from .seeds import curve_spread, format_spread, mean_sd, plot_spread, relative_curve, seed_list
from .tool_env import OPTIMIZER_HELP, TRAIN_OPTIMIZERS
from .user_dir import user_dir

# model name -> fairseq-train arguments that make it
MODELS = {
    "dense": ["--arch", "transformer_lm"],
    "hash": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "balanced"],
    "hash-random": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "random"],
    "switch": ["--arch", "hash_transformer_lm", "--router", "switch"],
    "top2": ["--arch", "hash_transformer_lm", "--router", "top2"],
    "base": ["--arch", "hash_transformer_lm", "--router", "base"],
    # DeepSeek-V4's form: k=2 hashed experts weighed by a learned softmax gate
    "hash-top2": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "balanced",
                  "--hash-topk", "2", "--hash-score", "softmax"],
    # a routed and a shared expert of half width each: a token's compute is the dense FFN's
    "hash-shared": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "balanced",
                    "--hash-shared-experts", "1", "--hash-expert-ffn-dim", "{half_ffn}",
                    "--hash-shared-ffn-dim", "{half_ffn}"],
}
# experts each token is computed by (per routed layer)
SLOTS = {"top2": 2, "hash-top2": 2}

PRESETS = {
    # about 2.5 minutes on 2 idle cores for all six models
    "tiny": dict(max_lines=3000, vocab_size=1000, layers=2, embed_dim=64, ffn_dim=128, heads=2,
                 experts="4", hash_layer="-1", tokens_per_sample=64, max_tokens=1024,
                 max_update=30, validate_every=10, lr=0.002, warmup_updates=5, dropout=0.1),
    # about 30 minutes on 2 idle cores for all six models
    "default": dict(max_lines=0, vocab_size=2000, layers=4, embed_dim=128, ffn_dim=512, heads=4,
                    experts="16", hash_layer="-1", tokens_per_sample=128, max_tokens=2048,
                    max_update=400, validate_every=50, lr=0.002, warmup_updates=50, dropout=0.1),
}

class CompareError(Exception):
    """Bad input: printed as one line naming the flag or file."""


def parse_models(spec):
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise CompareError(f"--models {spec!r}: unknown {', '.join(bad) or '(empty)'}; "
                           f"valid: {','.join(MODELS)}")
    return list(dict.fromkeys(names))


def parse_experts(spec):
    try:
        ks = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 2 for k in ks):
        raise CompareError(f"--experts {spec!r}: expected integers >= 2, comma-separated (e.g. 16 or 4,16)")
    return list(dict.fromkeys(ks))


def plan_runs(models, experts):
    """(run name, model, K) triples: dense once, every routed model once per K."""
    runs = []
    for model in models:
        if model == "dense":
            runs.append(("dense", model, None))
        else:
            for k in experts:
                runs.append((model if len(experts) == 1 else f"{model}-k{k}", model, k))
    return runs


def train_args(cfg, data_bin, save_dir, model, k, seed):
    """fairseq-train's arguments for one model and seed."""
    args = [data_bin, "--user-dir", user_dir(), "--task", "language_modeling",
            *[arg.format(half_ffn=cfg.ffn_dim // 2) for arg in MODELS[model]],
            "--decoder-layers", cfg.layers, "--decoder-embed-dim", cfg.embed_dim,
            "--decoder-ffn-embed-dim", cfg.ffn_dim,
            "--decoder-attention-heads", cfg.heads, "--dropout", cfg.dropout,
            "--share-decoder-input-output-embed",
            "--tokens-per-sample", cfg.tokens_per_sample, "--max-tokens", cfg.max_tokens,
            "--sample-break-mode", "none",
            "--optimizer", cfg.optimizer, "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
            "--lr", cfg.lr, "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", cfg.warmup_updates, "--warmup-init-lr", "1e-07",
            "--max-update", cfg.max_update, "--validate-interval-updates", cfg.validate_every,
            "--criterion", "moe_cross_entropy", "--moe-aux-loss-weight", cfg.aux_loss_weight,
            "--seed", seed, "--num-workers", "0", "--log-format", "json",
            "--log-interval", max(1, cfg.validate_every // 2),
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-save-optimizer-state",
            *device_flags()]
    if k is not None:
        args += ["--hash-experts", k, "--hash-layer", cfg.hash_layer,
                 "--capacity-factor", cfg.capacity_factor]
    return [str(a) for a in args]


def eval_args(cfg, data_bin, checkpoint, subset="test"):
    return [str(a) for a in [
        data_bin, "--path", checkpoint, "--user-dir", user_dir(), "--task", "language_modeling",
        "--gen-subset", subset, "--tokens-per-sample", cfg.tokens_per_sample,
        "--max-tokens", cfg.max_tokens, "--sample-break-mode", "none", "--num-workers", "0",
        *device_flags()]]


def summarise(name, model, k, seed, train, eval_ppl, seconds):
    """One seed's row: sizes from fairseq-train's log, perplexities from fairseq-eval-lm."""
    valid = [(int(r["valid_num_updates"]), r["valid_ppl"]) for r in train.records("valid")]
    # the first interval includes start-up (data loading, allocation): leave it out
    inner = train.records("train_inner")
    steady = inner[1:] if len(inner) > 1 else inner

    def mean(key):
        return sum(r.get(key, 0.0) for r in steady) / len(steady) if steady else None

    params = train.parameters()
    shared, expert = params["shared"], params["expert"]
    return {
        "name": name, "model": model, "experts": k, "seed": seed,
        "total_params": None if shared is None else shared + expert,
        "active_params": None if shared is None else
        shared + (expert * SLOTS.get(model, 1) // k if k else 0),
        "valid_ppl": eval_ppl["valid"],
        "test_ppl": eval_ppl["test"],
        "logged_valid_ppl": valid[-1][1] if valid else None,
        "train_wps": mean("wps"),
        "aux_loss": mean("moe_aux_loss"),
        "dropped": mean("moe_dropped"),
        "curve": valid,
        "seconds": round(seconds, 1),
        "ok": train.ok and eval_ppl["test"] is not None,
    }


def progress_printer(tag, max_update):
    def on_line(line):
        kind, rec = json_record(line) or (None, None)
        if kind == "valid":
            print(f"  {tag} update {rec.get('valid_num_updates'):.0f}/{max_update}: "
                  f"valid ppl {rec.get('valid_ppl')}", flush=True)
        elif kind == "train_inner":
            print(f"  {tag} update {rec.get('num_updates'):.0f}/{max_update}: train ppl "
                  f"{rec.get('ppl')}, {rec.get('wps')} words/s", flush=True)

    return on_line


def run_one(cfg, data_bin, out_dir, name, model, k, seed, index, count):
    run_dir = os.path.join(out_dir, "runs", name, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    tag = f"[{index}/{count} {name} seed {seed}]"
    print(f"{tag} training ({'dense FFN' if k is None else f'{k} experts'})", flush=True)
    start = time.time()
    checkpoints = os.path.join(run_dir, "checkpoints")
    train = run_fairseq("fairseq-train", train_args(cfg, data_bin, checkpoints, model, k, seed),
                        os.path.join(run_dir, "train.log"), progress_printer(tag, cfg.max_update))
    eval_ppl = {"valid": None, "test": None}
    checkpoint = os.path.join(checkpoints, "checkpoint_last.pt")
    if not train.ok:
        print(f"{tag} fairseq-train failed (exit {train.returncode}): {train.last_line()}; "
              f"see {run_dir}/train.log", flush=True)
    elif os.path.exists(checkpoint):
        # final numbers from fairseq-eval-lm: it scores every token of the split,
        # where fairseq-train's validation drops a last batch whose size is not a
        # multiple of --required-batch-size-multiple (8), blocks chosen by --seed (README)
        print(f"{tag} evaluating on the valid and test splits", flush=True)
        for subset in ("valid", "test"):
            scored = run_fairseq("fairseq-eval-lm", eval_args(cfg, data_bin, checkpoint, subset),
                                 os.path.join(run_dir, f"eval_{subset}.log"))
            eval_ppl[subset] = scored.eval_lm_perplexity()
            if not scored.ok or eval_ppl[subset] is None:
                print(f"{tag} fairseq-eval-lm failed; see {scored.log_path}", flush=True)
                break
    if not cfg.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    row = summarise(name, model, k, seed, train, eval_ppl, time.time() - start)
    print(f"{tag} done in {row['seconds']:.0f}s: valid ppl {_fmt(row['valid_ppl'], 2)}, "
          f"test ppl {_fmt(row['test_ppl'], 2)}", flush=True)
    return row


SPREAD_KEYS = ("valid_ppl", "test_ppl", "train_wps", "aux_loss", "dropped")


def aggregate(runs):
    """One row per model: every seed's numbers as mean and standard deviation."""
    dense = {r["seed"]: r["curve"] for r in runs if r["model"] == "dense"}
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        ok = [r for r in mine if r["ok"]]
        first = mine[0]
        row = {k: first[k] for k in ("name", "model", "experts", "total_params", "active_params")}
        row["seeds"] = [r["seed"] for r in ok]
        row["seeds_run"] = [r["seed"] for r in mine]
        row["ok"] = len(ok) == len(mine)
        for key in SPREAD_KEYS:
            row[key], row[key + "_sd"] = mean_sd([r[key] for r in ok])
            row[key + "_by_seed"] = [r[key] for r in mine]
        spread = curve_spread([r["curve"] for r in ok if r["curve"]])
        row["curve"] = [(u, m) for u, m, _ in spread]
        row["curve_sd"] = [(u, sd) for u, _, sd in spread]
        relative = [relative_curve(r["curve"], dense[r["seed"]]) for r in ok if r["seed"] in dense]
        row["relative_curve"] = curve_spread(relative) if first["model"] != "dense" else []
        rows.append(row)
    return rows


def _fmt(v, digits=2, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.{digits}f}%"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def _fmt_spread(row, key, digits=2, pct=False):
    mean, sd = row[key], row[key + "_sd"]
    if pct:
        return _fmt(mean, digits, pct) + ("" if sd is None else f" ± {100 * sd:.{digits}f}")
    return format_spread(mean, sd, digits)


def write_markdown(path, rows, settings):
    seeds = max((len(r["seeds"]) for r in rows), default=1)
    lines = [
        "# fairseq-hash-compare",
        "",
        "| model | experts | total params | active params / token | valid ppl | test ppl "
        "| train words/s | aux loss | tokens dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']}{'' if r['ok'] else ' (failed)'} | {r['experts'] or '-'} "
            f"| {_fmt(r['total_params'])} | {_fmt(r['active_params'])} "
            f"| {_fmt_spread(r, 'valid_ppl')} | {_fmt_spread(r, 'test_ppl')} "
            f"| {_fmt_spread(r, 'train_wps', 0)} | {_fmt_spread(r, 'aux_loss', 3)} "
            f"| {_fmt_spread(r, 'dropped', 1, pct=True)} |")
    if seeds > 1:
        lines += ["", "Test perplexity of each seed:", "",
                  "| model | " + " | ".join(f"seed {s}" for s in rows[0]["seeds_run"]) + " |",
                  "|---|" + "---:|" * len(rows[0]["seeds_run"])]
        for r in rows:
            lines.append(f"| {r['name']} | "
                         + " | ".join(_fmt(v) for v in r["test_ppl_by_seed"]) + " |")
    spread = (f"Each number is the mean over {seeds} seeds ± their sample standard deviation; "
              "the seed sets initialisation and data order. " if seeds > 1 else
              "One seed: differences smaller than a second seed would move them cannot be "
              "told apart (run --seeds 3). ")
    lines += [
        "",
        spread + "Perplexities are per sentencepiece token (base-2 loss, as fairseq reports) "
        "of the model after the last update, scored by fairseq-eval-lm on every token of "
        "the split. Words/s, aux loss (summed over routed layers) and tokens dropped "
        "(share of expert slots over capacity, training only) are means over training "
        "log intervals after the first. Words/s depends on the machine's load.",
        "",
        "curves.png: fairseq-train's validation at each validated update, mean over seeds "
        "with ± one standard deviation shaded; right, each model's over the dense model's of "
        "the same seed and update. fairseq-train validates the whole valid split less a last "
        "batch whose size is not a multiple of --required-batch-size-multiple (8): here "
        "blocks that --seed picks, so its numbers differ a little from fairseq-eval-lm's.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_curves(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        style = dict(marker="o", markersize=3, label=r["name"])
        line = plot_spread(ax, [(u, m, sd) for (u, m), (_, sd) in zip(r["curve"], r["curve_sd"])],
                           **style)
        if line is not None:
            plot_spread(rel, r["relative_curve"], color=line.get_color(), **style)
    seeds = max((len(r["seeds"]) for r in rows), default=1)
    over = f"mean of {seeds} seeds ± sd" if seeds > 1 else "one seed"
    ax.set_ylabel("validation perplexity (fairseq-train's log)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"validation perplexity, {over}")
    rel.axhline(1.0, color="black", linewidth=1)
    rel.set_ylabel("validation perplexity / dense's")
    rel.set_title("relative to dense, same seed and update")
    for a in (ax, rel):
        a.set_xlabel("updates")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir, runs, settings):
    rows = aggregate(runs)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "rows": rows, "runs": runs}, f, indent=2)
    write_markdown(os.path.join(out_dir, "results.md"), rows, settings)
    write_curves(os.path.join(out_dir, "curves.png"), rows)
    return rows


def build_parser():
    p = argparse.ArgumentParser(
        prog="fairseq-hash-compare", description="Train dense, hash and learned-routing language models with identical "
        "settings and tabulate them side by side.")
    p.add_argument("--output-dir", required=True,
                   help="folder for results.md, results.json, curves.png, data/ and the "
                   "runs/NAME/seedS/ logs")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to train, from {','.join(MODELS)} (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="sizes and lengths: tiny (< 3 min on 2 cores, a smoke test) or default "
                   "(~30 min on 2 cores; the default); every size flag overrides its preset value")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", nargs="+", metavar="FILE",
                      help="plain text files, one sentence or paragraph a line, to tokenise with "
                      "sentencepiece and binarise (default: the built-in corpus)")
    data.add_argument("--data-bin", metavar="DIR",
                      help="an existing fairseq language-modelling data-bin (dict.txt, train, "
                      "valid and test splits) to use as it is")
    size = p.add_argument_group("sizes (defaults in brackets: tiny preset, default preset)")
    size.add_argument("--experts", help="K, experts per routed layer; a comma-separated list "
                      "(e.g. 4,16) trains every routed model once per K")
    size.add_argument("--layers", type=int, help="decoder layers")
    size.add_argument("--embed-dim", type=int, help="model width d")
    size.add_argument("--ffn-dim", type=int, help="FFN hidden width, of the dense FFN and of each expert")
    size.add_argument("--heads", type=int, help="attention heads")
    size.add_argument("--hash-layer", help="0-based decoder layers whose FFN is routed "
                      "(comma-separated, negative from the end), the same for every routed model")
    size.add_argument("--tokens-per-sample", type=int, help="tokens in each training block")
    size.add_argument("--max-tokens", type=int, help="tokens in each batch")
    size.add_argument("--max-update", type=int, help="training updates of every model")
    size.add_argument("--validate-every", type=int, help="updates between validations (the curve's points)")
    size.add_argument("--lr", type=float, help="peak learning rate (Adam, inverse square root schedule)")
    size.add_argument("--warmup-updates", type=int,
                      help="updates of linear learning-rate warm-up (at least 1)")
    size.add_argument("--dropout", type=float, help="dropout of every model")
    size.add_argument("--max-lines", type=int, help="lines of the built-in corpus or --text to use (0: all)")
    size.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of every run: initialisation and data order (default 1)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every model with this many seeds, --seed, --seed + 1, ...; the "
                   "tables show each number's mean and standard deviation over them (default 1)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="switch: expert capacity in units of tokens / experts, training only "
                   "(default 1.25)")
    p.add_argument("--aux-loss-weight", type=float, default=0.01,
                   help="weight of the switch and top2 load-balancing loss (default 0.01)")
    p.add_argument("--optimizer", choices=TRAIN_OPTIMIZERS, default="adam",
                   help=f"fairseq optimizer of every run: {OPTIMIZER_HELP} (default adam)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoint_last.pt (deleted after evaluation otherwise)")
    show_presets(size, PRESETS)
    return p


def show_presets(group, presets):
    """End the help of each flag of ``group`` with its value in each preset: `` [tiny, default]``."""
    for action in group._group_actions:  # argparse keeps a group's flags here, and nowhere public
        action.help += " [" + ", ".join(str(presets[n][action.dest]) for n in ("tiny", "default")) + "]"


def resolve(args):
    """Fill the flags left unset from the preset and check them."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_list = parse_models(args.models)
    args.expert_list = parse_experts(args.experts)
    for flag in ("seeds", "layers", "embed_dim", "ffn_dim", "heads", "tokens_per_sample", "max_tokens",
                 "max_update", "validate_every", "warmup_updates", "vocab_size"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.embed_dim % args.heads:
        raise CompareError(f"--embed-dim {args.embed_dim} must be a multiple of --heads {args.heads}")
    if args.max_tokens < args.tokens_per_sample:
        raise CompareError(f"--max-tokens {args.max_tokens} must be at least --tokens-per-sample "
                           f"{args.tokens_per_sample}")
    if args.data_bin and not os.path.isfile(os.path.join(args.data_bin, "dict.txt")):
        raise CompareError(f"--data-bin {args.data_bin}: no dict.txt there; give a folder made by "
                           "fairseq-preprocess (or fairseq-hash-prepare's data-bin)")
    for path in args.text or []:
        if not os.path.isfile(path):
            raise CompareError(f"--text {path}: no such file")
    return args


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
    except CompareError as e:
        print(f"fairseq-hash-compare: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    os.makedirs(cfg.output_dir, exist_ok=True)
    load_start = os.getloadavg()[0]
    if cfg.data_bin:
        data_bin = os.path.abspath(cfg.data_bin)
    else:
        from .prepare import prepare

        print("preparing data (sentencepiece, fairseq-preprocess) ...", flush=True)
        data_bin = os.path.abspath(prepare(os.path.join(cfg.output_dir, "data"), cfg.text,
                                           cfg.vocab_size, max_lines=cfg.max_lines))
    runs = plan_runs(cfg.model_list, cfg.expert_list)
    settings = {k: getattr(cfg, k) for k in (
        "preset", "layers", "embed_dim", "ffn_dim", "heads", "hash_layer", "tokens_per_sample",
        "max_tokens", "max_update", "lr", "warmup_updates", "dropout", "seed", "seeds",
        "capacity_factor", "aux_loss_weight", "optimizer")}
    settings["data"] = data_bin
    settings["command"] = " ".join(["fairseq-hash-compare", *(sys.argv[1:] if argv is None else argv)])
    # seed by seed: an interrupted comparison holds whole seeds
    plan = [(seed, *run) for seed in seed_list(cfg.seed, cfg.seeds) for run in runs]
    done = []
    for i, (seed, name, model, k) in enumerate(plan, 1):
        done.append(run_one(cfg, data_bin, cfg.output_dir, name, model, k, seed, i, len(plan)))
        # rewritten after every run, so an interrupted comparison keeps what it has
        settings["load average (1 min) at start, now"] = f"{load_start:.1f}, {os.getloadavg()[0]:.1f}"
        write_results(cfg.output_dir, done, settings)
    print(open(os.path.join(cfg.output_dir, "results.md"), encoding="utf-8").read())
    return 0 if all(r["ok"] for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
