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
import logging
import os
import shutil
import sys
import time

from ...errors import HashConfigError
from ..command import command
from ..fairseq_runner import device_flags, json_record, run_fairseq
from ..tool_env import OPTIMIZER_HELP, TRAIN_OPTIMIZERS
from ..user_dir import user_dir
from .options import (add_width_flags, check_positive, check_widths, fill_presets,
                      parse_names, preset_flags)
from .results import (figure, fmt, format_spread, markdown_table, over_seeds, plot_spread,
                      recorded_path, seed_list, settings_line, write_json)

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

def parse_experts(spec):
    try:
        ks = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 2 for k in ks):
        raise HashConfigError(f"--experts {spec!r}: expected integers >= 2, comma-separated "
                              "(e.g. 16 or 4,16)")
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
        # multiple of --required-batch-size-multiple (8), blocks chosen by --seed (docs/fairseq-notes.md)
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
    print(f"{tag} done in {row['seconds']:.0f}s: valid ppl {fmt(row['valid_ppl'], 2)}, "
          f"test ppl {fmt(row['test_ppl'], 2)}", flush=True)
    return row


SPREAD_KEYS = ("valid_ppl", "test_ppl", "train_wps", "aux_loss", "dropped")


def aggregate(runs):
    """One row per model: every seed's numbers as mean and standard deviation."""
    return over_seeds(runs, "name", ["model", "experts", "total_params", "active_params"],
                      SPREAD_KEYS, "curve")


def write_markdown(path, rows, settings):
    seeds = max((len(r["seeds"]) for r in rows), default=1)

    def spread(row, key, digits=2, pct=False):
        return format_spread(row[key], row[key + "_sd"], digits, pct)

    lines = ["# fairseq-hash-compare", "", *markdown_table(
        ["model", "experts", "total params", "active params / token", "valid ppl", "test ppl",
         "train words/s", "aux loss", "tokens dropped"],
        [[f"{r['name']}{'' if r['ok'] else ' (failed)'}", r["experts"] or "-",
          fmt(r["total_params"]), fmt(r["active_params"]), spread(r, "valid_ppl"),
          spread(r, "test_ppl"), spread(r, "train_wps", 0), spread(r, "aux_loss", 3),
          spread(r, "dropped", 1, pct=True)] for r in rows])]
    if seeds > 1:
        lines += ["", "Test perplexity of each seed:", "", *markdown_table(
            ["model", *(f"seed {s}" for s in rows[0]["seeds_run"])],
            [[r["name"], *map(fmt, r["test_ppl_by_seed"])] for r in rows])]
    spread_note = (f"Each number is the mean over {seeds} seeds ± their sample standard deviation; "
                   "the seed sets initialisation and data order. " if seeds > 1 else
                   "One seed: differences smaller than a second seed would move them cannot be "
                   "told apart (run --seeds 3). ")
    lines += [
        "",
        spread_note + "Perplexities are per sentencepiece token (base-2 loss, as fairseq reports) "
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
        settings_line(settings),
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_curves(path, rows):
    import matplotlib.ticker

    with figure(path, 2) as (ax, rel):
        for r in rows:
            style = dict(marker="o", markersize=3, label=r["name"])
            line = plot_spread(ax, r["curve"], **style)
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


def write_results(out_dir, runs, settings):
    rows = aggregate(runs)
    write_json(os.path.join(out_dir, "results.json"), {"settings": settings, "rows": rows, "runs": runs})
    write_markdown(os.path.join(out_dir, "results.md"), rows, settings)
    write_curves(os.path.join(out_dir, "curves.png"), rows)
    return rows


def build_parser():
    p = argparse.ArgumentParser(
        prog="fairseq-hash-compare", description="Train dense, hash and learned-routing "
        "language models with identical settings and tabulate them side by side.")
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
    add = preset_flags(p.add_argument_group(
        "sizes (defaults in brackets: tiny preset, default preset)"), PRESETS)
    add("--experts", help="K, experts per routed layer; a comma-separated list "
        "(e.g. 4,16) trains every routed model once per K")
    add("--layers", type=int, help="decoder layers")
    add_width_flags(add)
    add("--hash-layer", help="0-based decoder layers whose FFN is routed "
        "(comma-separated, negative from the end), the same for every routed model")
    add("--tokens-per-sample", type=int, help="tokens in each training block")
    add("--max-tokens", type=int, help="tokens in each batch")
    add("--max-update", type=int, help="training updates of every model")
    add("--validate-every", type=int, help="updates between validations (the curve's points)")
    add("--lr", type=float, help="peak learning rate (Adam, inverse square root schedule)")
    add("--warmup-updates", type=int,
        help="updates of linear learning-rate warm-up (at least 1)")
    add("--dropout", type=float, help="dropout of every model")
    add("--max-lines", type=int, help="lines of the built-in corpus or --text to use (0: all)")
    add("--vocab-size", type=int, help="sentencepiece vocabulary size")
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
    return p


def resolve(args):
    """Fill the flags left unset from the preset and check them."""
    fill_presets(args, PRESETS)
    args.model_list = parse_names("--models", args.models, MODELS)
    args.expert_list = parse_experts(args.experts)
    check_positive(args, ("seeds", "layers", "tokens_per_sample", "max_tokens", "max_update",
                          "validate_every", "warmup_updates", "vocab_size"))
    check_widths(args)
    if args.max_tokens < args.tokens_per_sample:
        raise HashConfigError(f"--max-tokens {args.max_tokens} must be at least --tokens-per-sample "
                              f"{args.tokens_per_sample}")
    if args.data_bin and not os.path.isfile(os.path.join(args.data_bin, "dict.txt")):
        raise HashConfigError(f"--data-bin {args.data_bin}: no dict.txt there; give a folder made by "
                              "fairseq-preprocess (or fairseq-hash-prepare's data-bin)")
    for path in args.text or []:
        if not os.path.isfile(path):
            raise HashConfigError(f"--text {path}: no such file")
    return args


@command("fairseq-hash-compare")
def main(argv=None):
    cfg = resolve(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    os.makedirs(cfg.output_dir, exist_ok=True)
    load_start = os.getloadavg()[0]
    if cfg.data_bin:
        data_bin = os.path.abspath(cfg.data_bin)
    else:
        from ..data.prepare import prepare

        print("preparing data (sentencepiece, fairseq-preprocess) ...", flush=True)
        data_bin = os.path.abspath(prepare(os.path.join(cfg.output_dir, "data"), cfg.text,
                                           cfg.vocab_size, max_lines=cfg.max_lines))
    runs = plan_runs(cfg.model_list, cfg.expert_list)
    settings = {k: getattr(cfg, k) for k in (
        "preset", "layers", "embed_dim", "ffn_dim", "heads", "hash_layer", "tokens_per_sample",
        "max_tokens", "max_update", "lr", "warmup_updates", "dropout", "seed", "seeds",
        "capacity_factor", "aux_loss_weight", "optimizer")}
    settings["data"] = recorded_path(cfg.data_bin or data_bin, cfg.output_dir)
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
