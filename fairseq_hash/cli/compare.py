"""``fairseq-hash-compare``: train dense, hash and learned-routing LMs alike; tabulate.

    fairseq-hash-compare --output-dir work/compare --preset tiny      # < 3 min on 2 cores
    fairseq-hash-compare --output-dir work/compare                    # ~30 min on 2 cores
    fairseq-hash-compare --output-dir out --text a.txt --models hash,switch --experts 4,16

Every model is fairseq's ``transformer_lm`` with the same dimensions, seed,
data order, batches, updates and learning rate; the routed ones
(``hash_transformer_lm``) differ only in how the FFN of the ``--hash-layer``
layers routes tokens over the same K experts: ``hash`` (balanced hash),
``hash-random``, ``switch``, ``top2``, ``base``. ``dense`` keeps the plain FFN.
Each run is a ``fairseq-train`` process followed by ``fairseq-eval-lm`` on the
test split; their logs stay in ``OUTPUT/runs/NAME/``. The results go to
``OUTPUT/results.md``, ``OUTPUT/results.json`` and ``OUTPUT/curves.png``.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time

from .tool_env import OPTIMIZER_HELP, TRAIN_OPTIMIZERS, tool_env

logger = logging.getLogger("fairseq_hash.compare")

# model name -> fairseq-train arguments that make it
MODELS = {
    "dense": ["--arch", "transformer_lm"],
    "hash": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "balanced"],
    "hash-random": ["--arch", "hash_transformer_lm", "--router", "hash", "--hash-type", "random"],
    "switch": ["--arch", "hash_transformer_lm", "--router", "switch"],
    "top2": ["--arch", "hash_transformer_lm", "--router", "top2"],
    "base": ["--arch", "hash_transformer_lm", "--router", "base"],
}
# experts each token is computed by (per routed layer)
SLOTS = {"top2": 2}

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

TRAIN_LINE = re.compile(r"\| (train_inner|valid|train) \| (\{.*\})\s*$")
PARAMS_LINE = re.compile(r"num\. (shared|expert) model params: ([\d,]+)")
PPL_LINE = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+|inf|nan)")


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


def train_command(cfg, data_bin, save_dir, model, k):
    cmd = [sys.executable, "-m", "fairseq_cli.train", data_bin,
           "--user-dir", user_dir(), "--task", "language_modeling",
           *MODELS[model],
           "--decoder-layers", str(cfg.layers), "--decoder-embed-dim", str(cfg.embed_dim),
           "--decoder-ffn-embed-dim", str(cfg.ffn_dim),
           "--decoder-attention-heads", str(cfg.heads), "--dropout", str(cfg.dropout),
           "--share-decoder-input-output-embed",
           "--tokens-per-sample", str(cfg.tokens_per_sample), "--max-tokens", str(cfg.max_tokens),
           "--sample-break-mode", "none",
           "--optimizer", cfg.optimizer, "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
           "--lr", str(cfg.lr), "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", str(cfg.warmup_updates), "--warmup-init-lr", "1e-07",
           "--max-update", str(cfg.max_update), "--validate-interval-updates", str(cfg.validate_every),
           "--criterion", "moe_cross_entropy", "--moe-aux-loss-weight", str(cfg.aux_loss_weight),
           "--seed", str(cfg.seed), "--num-workers", "0", "--log-format", "json",
           "--log-interval", str(max(1, cfg.validate_every // 2)),
           "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-save-optimizer-state"]
    if k is not None:
        cmd += ["--hash-experts", str(k), "--hash-layer", cfg.hash_layer,
                "--capacity-factor", str(cfg.capacity_factor)]
    if not cuda_available():
        cmd.append("--cpu")
    return cmd


def eval_command(cfg, data_bin, checkpoint, subset="test"):
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", data_bin, "--path", checkpoint,
           "--user-dir", user_dir(), "--task", "language_modeling", "--gen-subset", subset,
           "--tokens-per-sample", str(cfg.tokens_per_sample), "--max-tokens", str(cfg.max_tokens),
           "--sample-break-mode", "none", "--num-workers", "0"]
    if not cuda_available():
        cmd.append("--cpu")
    return cmd


def user_dir():
    from .user_dir import user_dir as path

    return path()


def cuda_available():
    import torch

    return torch.cuda.is_available()


def run_logged(cmd, log_path, on_line=None):
    """Run ``cmd``, writing its output to ``log_path``; returns (exit code, lines)."""
    lines = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("# " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=tool_env(), bufsize=1)
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if on_line:
                on_line(line)
        return proc.wait(), lines


def parse_train_log(lines):
    """Curves and totals from a fairseq-train log written with --log-format json."""
    out = {"valid": [], "train_inner": [], "shared_params": None, "expert_params": 0}
    for line in lines:
        m = PARAMS_LINE.search(line)
        if m:
            out[m.group(1) + "_params"] = int(m.group(2).replace(",", ""))
            continue
        m = TRAIN_LINE.search(line)
        if m and m.group(1) != "train":
            out[m.group(1)].append({k: _number(v) for k, v in json.loads(m.group(2)).items()})
    return out


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def summarise(name, model, k, log, test_ppl, seconds):
    valid = [(int(r["valid_num_updates"]), r["valid_ppl"]) for r in log["valid"]]
    inner = log["train_inner"]
    # the first interval includes start-up (data loading, allocation): leave it out
    steady = inner[1:] if len(inner) > 1 else inner

    def mean(key):
        return sum(r.get(key, 0.0) for r in steady) / len(steady) if steady else None

    shared, expert = log["shared_params"], log["expert_params"]
    total = None if shared is None else shared + expert
    active = None if shared is None else shared + (expert * SLOTS.get(model, 1) // k if k else 0)
    return {
        "name": name, "model": model, "experts": k,
        "total_params": total, "active_params": active,
        "valid_ppl": valid[-1][1] if valid else None,
        "best_valid_ppl": min(p for _, p in valid) if valid else None,
        "test_ppl": test_ppl,
        "train_wps": mean("wps"),
        "aux_loss": mean("moe_aux_loss"),
        "dropped": mean("moe_dropped"),
        "curve": valid,
        "seconds": round(seconds, 1),
    }


def progress_printer(tag, max_update):
    def on_line(line):
        m = TRAIN_LINE.search(line)
        if not m or m.group(1) == "train":
            return
        rec = json.loads(m.group(2))
        if m.group(1) == "valid":
            print(f"  {tag} update {rec.get('valid_num_updates')}/{max_update}: "
                  f"valid ppl {rec.get('valid_ppl')}", flush=True)
        else:
            print(f"  {tag} update {rec.get('num_updates')}/{max_update}: train ppl {rec.get('ppl')}"
                  f", {rec.get('wps')} words/s", flush=True)

    return on_line


def run_one(cfg, data_bin, out_dir, name, model, k, index, count):
    run_dir = os.path.join(out_dir, "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    tag = f"[{index}/{count} {name}]"
    print(f"{tag} training ({'dense FFN' if k is None else f'{k} experts'})", flush=True)
    start = time.time()
    code, lines = run_logged(train_command(cfg, data_bin, os.path.join(run_dir, "checkpoints"), model, k),
                             os.path.join(run_dir, "train.log"), progress_printer(tag, cfg.max_update))
    log = parse_train_log(lines)
    test_ppl = None
    eval_ppl = {"valid": None, "test": None}
    checkpoint = os.path.join(run_dir, "checkpoints", "checkpoint_last.pt")
    if code != 0:
        tail = "".join(lines[-3:]).strip().splitlines()
        print(f"{tag} fairseq-train failed (exit {code}): {tail[-1] if tail else ''}; "
              f"see {run_dir}/train.log", flush=True)
    elif os.path.exists(checkpoint):
        # fairseq-eval-lm scores a whole split; the validation loss that
        # fairseq-fixed's trainer logs covers one batch of it (see README)
        print(f"{tag} evaluating on the valid and test splits", flush=True)
        for subset in ("valid", "test"):
            code, eval_lines = run_logged(eval_command(cfg, data_bin, checkpoint, subset),
                                          os.path.join(run_dir, f"eval_{subset}.log"))
            ppl = [float(m.group(2)) for m in map(PPL_LINE.search, eval_lines) if m]
            eval_ppl[subset] = ppl[-1] if ppl else None
            if code != 0 or not ppl:
                print(f"{tag} fairseq-eval-lm failed; see {run_dir}/eval_{subset}.log", flush=True)
                break
        test_ppl = eval_ppl["test"]
    if not cfg.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    row = summarise(name, model, k, log, test_ppl, time.time() - start)
    row["logged_valid_ppl"], row["valid_ppl"] = row["valid_ppl"], eval_ppl["valid"]
    row["ok"] = code == 0 and test_ppl is not None
    print(f"{tag} done in {row['seconds']:.0f}s: valid ppl {_fmt(row['valid_ppl'], 2)}, "
          f"test ppl {_fmt(test_ppl, 2)}", flush=True)
    return row


def _fmt(v, digits=2, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.{digits}f}%"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def write_markdown(path, rows, settings):
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
            f"| {_fmt(r['total_params'])} | {_fmt(r['active_params'])} | {_fmt(r['valid_ppl'])} "
            f"| {_fmt(r['test_ppl'])} | {_fmt(r['train_wps'], 0)} | {_fmt(r['aux_loss'], 3)} "
            f"| {_fmt(r['dropped'], 1, pct=True)} |")
    lines += [
        "",
        "Perplexities are per sentencepiece token (base-2 loss, as fairseq reports), of the "
        "model after the last update, both scored on the whole split by fairseq-eval-lm "
        "(curves.png shows fairseq-train's logged validation, which in fairseq-fixed covers "
        "one batch of the split). Words/s, aux loss (summed over routed layers) and tokens dropped "
        "(share of expert slots over capacity, training only) are means over training "
        "log intervals after the first. Words/s depends on the machine's load.",
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

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", markersize=3, label=r["name"])
    ax.set_xlabel("updates")
    ax.set_ylabel("validation perplexity (fairseq-train's log: one batch)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("fairseq-hash-compare")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir, rows, settings):
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2)
    write_markdown(os.path.join(out_dir, "results.md"), rows, settings)
    write_curves(os.path.join(out_dir, "curves.png"), rows)


def build_parser():
    p = argparse.ArgumentParser(
        prog="fairseq-hash-compare", description="Train dense, hash and learned-routing language models with identical "
        "settings and tabulate them side by side.")
    p.add_argument("--output-dir", required=True,
                   help="folder for results.md, results.json, curves.png, data/ and runs/NAME/ logs")
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
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="switch: expert capacity in units of tokens / experts, training only "
                   "(default 1.25)")
    p.add_argument("--aux-loss-weight", type=float, default=0.01,
                   help="weight of the switch and top2 load-balancing loss (default 0.01)")
    p.add_argument("--optimizer", choices=TRAIN_OPTIMIZERS, default="adam",
                   help=f"fairseq optimizer of every run: {OPTIMIZER_HELP} (default adam)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoint_last.pt (deleted after evaluation otherwise)")
    for action in size._group_actions:
        key = action.dest
        action.help += " [" + ", ".join(str(PRESETS[n][key]) for n in ("tiny", "default")) + "]"
    return p


def resolve(args):
    """Fill the flags left unset from the preset and check them."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_list = parse_models(args.models)
    args.expert_list = parse_experts(args.experts)
    for flag in ("layers", "embed_dim", "ffn_dim", "heads", "tokens_per_sample", "max_tokens",
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
        "max_tokens", "max_update", "lr", "warmup_updates", "dropout", "seed", "capacity_factor",
        "aux_loss_weight")}
    settings["data"] = data_bin
    settings["command"] = " ".join(["fairseq-hash-compare", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for i, (name, model, k) in enumerate(runs, 1):
        rows.append(run_one(cfg, data_bin, cfg.output_dir, name, model, k, i, len(runs)))
        # rewritten after every run, so an interrupted comparison keeps what it has
        settings["load average (1 min) at start, now"] = f"{load_start:.1f}, {os.getloadavg()[0]:.1f}"
        write_results(cfg.output_dir, rows, settings)
    print(open(os.path.join(cfg.output_dir, "results.md"), encoding="utf-8").read())
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
