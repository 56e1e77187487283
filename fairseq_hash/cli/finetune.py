"""``fairseq-hash-finetune``: pretrain dense and hash models alike, fine-tune them, compare.

    fairseq-hash-finetune --output-dir work/finetune --preset tiny
    fairseq-hash-finetune --output-dir out --text docs.txt --labels labels.txt
    fairseq-hash-finetune --output-dir out --data-bin cls-bin          # input0/ and label/
    fairseq-hash-finetune --output-dir out --dialogues chats.txt --tasks seq2seq

Two tasks (``--tasks``), three models each (``--models``): ``dense`` and
``hash`` have the same dimensions, seed, data order, batches, updates and
learning rates; ``hash`` routes the FFN of the ``--hash-layer`` layers over K
experts by a balanced hash of the token; ``upcycled`` is dense's pretrained
checkpoint through ``fairseq-hash-upcycle``, fine-tuned as a hash model.

- ``classify``: fairseq's RoBERTa (``roberta``, ``hash_roberta``) pretrained
  with ``masked_lm`` on the training split's text, then fine-tuned with
  ``sentence_prediction``; its accuracy on the held-out test split is
  fairseq-train's score of that split after the last update.
- ``seq2seq``: fairseq's ``transformer`` (``hash_transformer``, hash layers on
  both sides) on the next-utterance task; see finetune_seq2seq.py.

With no ``--text``/``--data-bin`` the classification task is the built-in
corpus's (Python's standard-library docstrings): which package a paragraph
documents, among the ``--classes`` packages with the most paragraphs, each class
cut to the same size so that chance is 1 / classes. Logs stay in
``OUTPUT/runs/NAME/``; the results go to ``OUTPUT/results.md``,
``OUTPUT/results.json`` and ``OUTPUT/curves.png``.
"""
import argparse
import collections
import json
import logging
import os
import shutil
import sys
import time

from .compare import _fmt, show_presets
from . import finetune_seq2seq as seq2seq
from .fairseq_runner import device_flags, run_fairseq
from .user_dir import user_dir

# model name -> fairseq-train arguments that make it
MODELS = {
    "dense": ["--arch", "roberta"],
    "hash": ["--arch", "hash_roberta", "--hash-type", "balanced"],
    # the dense pretrained checkpoint through fairseq-hash-upcycle, then fine-tuned as hash
    "upcycled": ["--arch", "hash_roberta", "--hash-type", "balanced"],
}
TASKS = ("classify", "seq2seq")

PRESETS = {
    # 4 min 28 s on 2 busy cores for all six runs, built-in corpus included
    "tiny": dict(classes=4, vocab_size=1000, layers=2, embed_dim=64, ffn_dim=128, heads=2,
                 experts=4, hash_layer="-1", max_positions=128, max_tokens=2048,
                 pretrain_updates=100, finetune_updates=100, validate_every=25,
                 lr=0.002, finetune_lr=0.001, warmup_updates=10),
    # larger models and longer runs; not yet timed
    "default": dict(classes=4, vocab_size=2000, layers=4, embed_dim=128, ffn_dim=512, heads=4,
                    experts=16, hash_layer="-1", max_positions=256, max_tokens=4096,
                    pretrain_updates=1000, finetune_updates=600, validate_every=50,
                    lr=0.001, finetune_lr=0.0003, warmup_updates=50),
}
SPLITS = ("train", "valid", "test")


class FinetuneError(Exception):
    """Bad input: printed as one line naming the flag or file."""


# ---------------------------------------------------------------- data

def package_lines(classes):
    """(text lines, labels) of the built-in corpus: which stdlib package a paragraph is from.

    The ``classes`` packages with the most paragraphs, each cut to the smallest one's count.
    """
    from .prepare import builtin_corpus_items

    items = builtin_corpus_items()
    # a package is a top-level name with submodules; single modules are left out
    packages = {name.split(".")[0] for name, _ in items if "." in name}
    by_package = collections.defaultdict(list)
    for name, line in items:
        if name.split(".")[0] in packages:
            by_package[name.split(".")[0]].append(line)
    top = sorted(by_package, key=lambda p: (-len(by_package[p]), p))[:classes]
    size = min(len(by_package[p]) for p in top)
    lines, labels = [], []
    for package in top:
        lines += by_package[package][:size]
        labels += [package] * size
    return lines, labels


def read_labelled(text, labels):
    """Aligned (lines, labels) of two files, whitespace normalised; blank text lines dropped."""
    with open(text, encoding="utf-8", errors="replace") as f:
        lines = [" ".join(l.split()) for l in f.read().splitlines()]
    with open(labels, encoding="utf-8", errors="replace") as f:
        names = [l.strip() for l in f.read().splitlines()]
    if len(lines) != len(names):
        raise FinetuneError(f"--labels {labels}: {len(names)} lines, but --text {text} has "
                            f"{len(lines)}; give one label a line, aligned with the text")
    pairs = [(l, n) for l, n in zip(lines, names) if l]
    if any(not n or " " in n for _, n in pairs):
        raise FinetuneError(f"--labels {labels}: a label is empty or holds a space; "
                            "give one word a line")
    return [l for l, _ in pairs], [n for _, n in pairs]


def build_data(out_dir, lines, labels, vocab_size, valid_pct, test_pct):
    """OUTPUT/data/cls-bin/{input0,label}: sentencepiece text and labels, split alike."""
    from .prepare import prepare, split_of

    cls_bin = os.path.join(out_dir, "data", "cls-bin")
    if os.path.isfile(os.path.join(cls_bin, "label", "dict.txt")):
        logging.info(f"{cls_bin} exists; reusing it (delete it to rebuild)")
        return cls_bin
    data = os.path.join(out_dir, "data")
    raw = os.path.join(data, "raw")
    os.makedirs(raw, exist_ok=True)
    text = os.path.join(data, "all.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    # prepare splits by the line's hash, in order: the labels follow the same rule
    data_bin = prepare(data, [text], vocab_size, valid_pct, test_pct)
    label_files = {s: open(os.path.join(raw, f"{s}.label"), "w", encoding="utf-8") for s in SPLITS}
    for line, label in zip(lines, labels):
        label_files[split_of(line, valid_pct, test_pct)].write(label + "\n")
    for f in label_files.values():
        f.close()
    tmp = cls_bin + ".tmp"
    for field, suffix, extra in (("input0", "spm", ["--srcdict", os.path.join(data_bin, "dict.txt")]),
                                 ("label", "label", [])):
        done = run_fairseq("fairseq-preprocess", [
            "--only-source", *[a for s in SPLITS for a in (f"--{s}pref", os.path.join(raw, f"{s}.{suffix}"))],
            "--destdir", os.path.join(tmp, field), "--workers", "1", *extra],
            os.path.join(data, f"preprocess_{field}.log"))
        if not done.ok:
            raise FinetuneError(f"fairseq-preprocess failed ({done.last_line()}); see {done.log_path}")
    os.replace(tmp, cls_bin)
    return cls_bin


def label_count(cls_bin):
    """Classes in label/dict.txt (fairseq's sentence_prediction needs --num-classes).

    fairseq-preprocess pads a dictionary to a multiple of 8 with ``madeupwordNNNN``
    entries, which come last and are no class.
    """
    with open(os.path.join(cls_bin, "label", "dict.txt"), encoding="utf-8") as f:
        return sum(1 for line in f if line.strip() and not line.startswith("madeupword"))


def split_sizes(cls_bin):
    """Sentences of each split of label/."""
    from fairseq.data import data_utils

    return {s: len(data_utils.load_indexed_dataset(os.path.join(cls_bin, "label", s), None))
            for s in SPLITS}


# ---------------------------------------------------------------- runs

def shape_args(cfg, model):
    args = [*MODELS[model], "--encoder-layers", cfg.layers, "--encoder-embed-dim", cfg.embed_dim,
            "--encoder-ffn-embed-dim", cfg.ffn_dim, "--encoder-attention-heads", cfg.heads,
            "--max-positions", cfg.max_positions]
    if model != "dense":
        args += ["--hash-experts", cfg.experts, "--encoder-hash-layer", cfg.hash_layer]
    return args


def common_args(cfg, lr, updates):
    return ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
            "--lr", lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", cfg.warmup_updates,
            "--warmup-init-lr", "1e-07", "--max-update", updates, "--max-tokens", cfg.max_tokens,
            "--seed", cfg.seed, "--num-workers", "0", "--log-format", "json",
            "--log-interval", max(1, cfg.validate_every // 2),
            "--validate-interval-updates", cfg.validate_every,
            "--no-epoch-checkpoints", "--no-save-optimizer-state", *device_flags()]


def pretrain_args(cfg, cls_bin, model, save_dir):
    return [str(a) for a in [
        os.path.join(cls_bin, "input0"), "--user-dir", user_dir(), "--task", "masked_lm",
        "--criterion", "masked_lm", *shape_args(cfg, model),
        "--tokens-per-sample", cfg.max_positions, "--sample-break-mode", "none",
        *common_args(cfg, cfg.lr, cfg.pretrain_updates), "--save-dir", save_dir]]


def finetune_args(cfg, cls_bin, model, checkpoint, save_dir, classes):
    return [str(a) for a in [
        cls_bin, "--user-dir", user_dir(), "--task", "sentence_prediction",
        "--criterion", "sentence_prediction", "--num-classes", classes,
        "--init-token", "0", "--separator-token", "2", "--shorten-method", "truncate",
        *shape_args(cfg, model), *common_args(cfg, cfg.finetune_lr, cfg.finetune_updates),
        "--restore-file", checkpoint, "--reset-optimizer", "--reset-dataloader",
        "--reset-meters", "--reset-lr-scheduler", "--best-checkpoint-metric", "accuracy",
        "--maximize-best-checkpoint-metric", "--save-dir", save_dir,
        # the test split is scored at each validation too; the last one is the model's result
        # (fairseq-validate cannot load a sentence_prediction checkpoint: its task config
        # interpolates ${criterion.classification_head_name}, absent without a criterion)
        "--valid-subset", "valid,test", "--required-batch-size-multiple", "1"]]


def run_model(cfg, cls_bin, model, classes, tag):
    """Pretrain (or upcycle), fine-tune and test one classifier; returns its row."""
    run_dir = os.path.join(cfg.output_dir, "runs", model)
    os.makedirs(run_dir, exist_ok=True)
    row = {"model": model, "experts": None if model == "dense" else cfg.experts, "ok": False,
           "pretrain_valid_loss": None, "valid_accuracy": None, "test_accuracy": None,
           "total_params": None, "curve": []}
    checkpoint, pre = seq2seq.starting_point(
        cfg, run_dir, os.path.join(cfg.output_dir, "runs", "dense"), model, tag, "masked-LM", ["--encoder-hash-layer"],
        lambda save_dir: pretrain_args(cfg, cls_bin, model, save_dir))
    valid = pre.records("valid") if pre else []
    row["pretrain_valid_loss"] = valid[-1].get("valid_loss") if valid else None
    if checkpoint is None:
        return row
    fine_dir = os.path.join(run_dir, "finetune")
    print(f"{tag} sentence_prediction fine-tuning, {cfg.finetune_updates} updates", flush=True)
    fine = run_fairseq("fairseq-train", finetune_args(cfg, cls_bin, model, checkpoint, fine_dir, classes),
                       os.path.join(run_dir, "finetune.log"))
    params = fine.parameters()
    if params["shared"] is not None:
        row["total_params"] = params["shared"] + params["expert"]
    row["curve"] = [(int(r["valid_num_updates"]), r["valid_accuracy"] / 100)
                    for r in fine.records("valid") if "valid_accuracy" in r]
    row["valid_accuracy"] = row["curve"][-1][1] if row["curve"] else None
    tested = [r for r in fine.records("test") if "test_accuracy" in r]
    if not fine.ok or not tested:
        print(f"{tag} fine-tuning failed: {fine.last_line()}; see {fine.log_path}", flush=True)
    else:
        row["test_accuracy"] = tested[-1]["test_accuracy"] / 100
        row["ok"] = True
    return row


def timed(row, start, tag, summary):
    row["seconds"] = round(time.time() - start, 1)
    print(f"{tag} done in {row['seconds']:.0f}s: {summary}", flush=True)
    return row


# ---------------------------------------------------------------- results

def write_results(out_dir, rows, s2s_rows, settings):
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "rows": rows, "seq2seq_rows": s2s_rows}, f, indent=2)
    lines = ["# fairseq-hash-finetune", ""]
    if "classify" in settings["tasks"]:
        lines += [
            "## Classification: masked-LM pretraining, sentence_prediction fine-tuning", "",
            "| model | experts | total params | masked-LM valid loss | valid accuracy | test accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['model']}{'' if r['ok'] else ' (failed)'} | {r['experts'] or '-'} "
                         f"| {_fmt(r['total_params'])} | {_fmt(r['pretrain_valid_loss'])} "
                         f"| {_fmt(r['valid_accuracy'], 1, pct=True)} "
                         f"| {_fmt(r['test_accuracy'], 1, pct=True)} |")
        lines += [
            "",
            f"Task: {settings['task']}; {settings['classes']} classes (chance "
            f"{_fmt(settings['chance'], 1, pct=True)}, the largest class's share of the test split); "
            f"sentences train/valid/test {settings['split_sizes']}.",
            "",
            "Masked-LM valid loss is fairseq-train's last validation (base 2) after pretraining; "
            "upcycled starts from dense's pretrained model, so it has none of its own. Valid and test "
            "accuracy are fairseq-train's scores of those splits after the last fine-tuning update.",
            "",
        ]
    if "seq2seq" in settings["tasks"]:
        lines += ["## Next utterance: seq2seq pretraining and fine-tuning", "",
                  *seq2seq.table(s2s_rows, _fmt), "",
                  f"Conversations: {settings['dialogues']}; pairs (line, next line) "
                  f"train/valid/test: pretraining {settings['s2s_pretrain_sizes']}, fine-tuning "
                  f"{settings['s2s_finetune_sizes']}.", "",
                  "Perplexities are fairseq-train's last validation of each stage (per "
                  "sentencepiece token). BLEU is sacrebleu's, from fairseq-generate --beam 5 on the "
                  "fine-tuning test split after the last update, sentencepiece removed; pairs "
                  "whose target is longer than --max-positions are skipped (the sources are "
                  "truncated), so the last column counts the pairs scored.", ""]
    lines += [
        f"One seed ({settings['seed']}): differences smaller than another seed would move them cannot "
        "be told apart (run again with --seed).",
        "",
        "curves.png: validation accuracy and perplexity during fine-tuning.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None and k not in (
            "task", "split_sizes", "dialogues", "s2s_pretrain_sizes", "s2s_finetune_sizes")),
        "",
    ]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_curves(os.path.join(out_dir, "curves.png"), rows, s2s_rows, settings["chance"])


def write_curves(path, rows, s2s_rows, chance):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ((rows, "validation accuracy", "sentence_prediction"),
                          (s2s_rows, "validation perplexity", "next utterance (seq2seq)"))
              if any(r["curve"] for r in p[0])]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4),
                             squeeze=False)
    for ax, (panel, ylabel, title) in zip(axes[0], panels):
        for r in panel:
            if r["curve"]:
                ax.plot(*zip(*r["curve"]), marker="o", markersize=3, label=r["model"])
        if panel is rows and chance is not None:
            ax.axhline(chance, color="black", linewidth=1, linestyle="--", label="chance")
        ax.set_xlabel("fine-tuning updates")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def majority_share(cls_bin, split="test"):
    """The largest class's share of a split: the accuracy of always guessing it."""
    from fairseq.data import data_utils

    labels = data_utils.load_indexed_dataset(os.path.join(cls_bin, "label", split), None)
    counts = collections.Counter(int(labels[i][0]) for i in range(len(labels)))
    return max(counts.values()) / len(labels) if labels else None


# ---------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(
        prog="fairseq-hash-finetune", description="Pretrain dense and hash-layer models of the same "
        "shape, fine-tune each (and the upcycled dense one) on a classification task "
        "(RoBERTa, sentence_prediction) and on a next-utterance seq2seq task (transformer), and "
        "report test accuracy, perplexity and BLEU.")
    p.add_argument("--output-dir", default="outputs/finetune",
                   help="folder for results.md, results.json, curves.png, data/ and runs/NAME/ "
                   "logs (default outputs/finetune)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="sizes and lengths: tiny (< 5 min on 2 cores) or default (larger, not yet "
                   "timed; the default); every size flag overrides its preset value")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models, from {','.join(MODELS)} (default: all); "
                   "upcycled fine-tunes dense's pretrained model, so it needs dense")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated fine-tuning tasks, from {','.join(TASKS)} (default: both)")
    p.add_argument("--dialogues", metavar="FILE",
                   help="seq2seq: conversations to fine-tune on, one turn a line and a blank line "
                   "between conversations; pretraining then uses the whole built-in corpus "
                   "(default: the built-in corpus's docstrings, one module a conversation, "
                   "fine-tuning on the classification task's packages)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", metavar="FILE",
                      help="a text file, one example a line, to tokenise with sentencepiece "
                      "(needs --labels; default: the built-in corpus's package task)")
    data.add_argument("--data-bin", metavar="DIR",
                      help="an existing sentence_prediction folder made by fairseq-preprocess: "
                      "input0/ (text, also pretrained on) and label/, each with train, valid and "
                      "test splits")
    p.add_argument("--labels", metavar="FILE",
                   help="with --text: one label (a word) a line, aligned with the text's lines")
    size = p.add_argument_group("sizes (defaults in brackets: tiny preset, default preset)")
    size.add_argument("--classes", type=int,
                      help="built-in task: how many standard-library packages to tell apart "
                      "(also seq2seq's fine-tuning domain)")
    size.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size")
    size.add_argument("--layers", type=int, help="encoder layers (and decoder layers of the "
                      "seq2seq models)")
    size.add_argument("--embed-dim", type=int, help="model width d")
    size.add_argument("--ffn-dim", type=int, help="FFN hidden width, of the dense FFN and of each expert")
    size.add_argument("--heads", type=int, help="attention heads")
    size.add_argument("--experts", type=int, help="K, experts of each hash layer")
    size.add_argument("--hash-layer", help="0-based encoder (and seq2seq decoder) layers whose "
                      "FFN is hashed (comma-separated, negative from the end)")
    size.add_argument("--max-positions", type=int,
                      help="longest input in tokens; longer sentences are truncated")
    size.add_argument("--max-tokens", type=int, help="tokens in each batch")
    size.add_argument("--pretrain-updates", type=int, help="pretraining updates of each model")
    size.add_argument("--finetune-updates", type=int, help="fine-tuning updates of each model")
    size.add_argument("--validate-every", type=int, help="updates between validations")
    size.add_argument("--lr", type=float, help="peak learning rate of pretraining (Adam)")
    size.add_argument("--finetune-lr", type=float, help="peak learning rate of fine-tuning (Adam)")
    size.add_argument("--warmup-updates", type=int, help="updates of linear learning-rate warm-up")
    p.add_argument("--valid-pct", type=float, default=10.0,
                   help="with --text or the built-in corpus: percent of lines held out for "
                   "validation (default 10)")
    p.add_argument("--test-pct", type=float, default=10.0,
                   help="with --text or the built-in corpus: percent of lines held out for "
                   "test (default 10)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of every run: initialisation, masking and data order (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoints (deleted after testing otherwise)")
    show_presets(size, PRESETS)
    return p


def resolve(args):
    """Fill the flags left unset from the preset and check them."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_list = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    bad = [m for m in args.model_list if m not in MODELS]
    if bad or not args.model_list:
        raise FinetuneError(f"--models {args.models!r}: unknown {', '.join(bad) or '(empty)'}; "
                            f"valid: {','.join(MODELS)}")
    if "upcycled" in args.model_list and "dense" not in args.model_list:
        raise FinetuneError(f"--models {args.models!r}: upcycled fine-tunes dense's pretrained "
                            "model; add dense")
    args.model_list.sort(key=list(MODELS).index)  # dense is pretrained before it is upcycled
    args.task_list = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    bad = [t for t in args.task_list if t not in TASKS]
    if bad or not args.task_list:
        raise FinetuneError(f"--tasks {args.tasks!r}: unknown {', '.join(bad) or '(empty)'}; "
                            f"valid: {','.join(TASKS)}")
    for flag in ("classes", "layers", "embed_dim", "ffn_dim", "heads", "max_positions", "max_tokens",
                 "pretrain_updates", "finetune_updates", "validate_every", "warmup_updates",
                 "vocab_size"):
        if getattr(args, flag) < 1:
            raise FinetuneError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.experts < 2:
        raise FinetuneError(f"--experts {args.experts}: must be at least 2")
    if args.embed_dim % args.heads:
        raise FinetuneError(f"--embed-dim {args.embed_dim} must be a multiple of --heads {args.heads}")
    if args.max_tokens < args.max_positions:
        raise FinetuneError(f"--max-tokens {args.max_tokens} must be at least --max-positions "
                            f"{args.max_positions}")
    if bool(args.text) != bool(args.labels):
        raise FinetuneError("--text and --labels go together: give both, or neither")
    for flag in ("text", "labels", "dialogues"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise FinetuneError(f"--{flag} {path}: no such file")
    if args.data_bin:
        for field in ("input0", "label"):
            for name in ("dict.txt", *[f"{s}.idx" for s in SPLITS]):
                if not os.path.isfile(os.path.join(args.data_bin, field, name)):
                    raise FinetuneError(f"--data-bin {args.data_bin}: no {field}/{name}; give a "
                                        "folder of input0/ and label/, each made by fairseq-preprocess "
                                        "--only-source with train, valid and test splits")
    return args


def main(argv=None):
    args = build_parser().parse_args(argv)
    lines = labels = dialogues = None
    try:
        cfg = resolve(args)
        if cfg.text:
            lines, labels = read_labelled(cfg.text, cfg.labels)
        if cfg.dialogues:
            dialogues = seq2seq.read_dialogues(cfg.dialogues)
    except (FinetuneError, ValueError) as e:
        print(f"fairseq-hash-finetune: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    os.makedirs(cfg.output_dir, exist_ok=True)
    settings = {"tasks": ",".join(cfg.task_list), "chance": None}
    settings.update({k: getattr(cfg, k) for k in (
        "preset", "layers", "embed_dim", "ffn_dim", "heads", "experts", "hash_layer",
        "max_positions", "max_tokens", "pretrain_updates", "finetune_updates", "lr",
        "finetune_lr", "warmup_updates", "seed")})
    settings["command"] = " ".join(["fairseq-hash-finetune", *(sys.argv[1:] if argv is None else argv)])
    try:
        jobs = []
        if "classify" in cfg.task_list:
            cls_bin = prepare_classification(cfg, settings, lines, labels)
            classes = settings["classes"]
            jobs += [("classify", m, lambda m, tag: run_model(cfg, cls_bin, m, classes, tag))
                     for m in cfg.model_list]
        if "seq2seq" in cfg.task_list:
            bins = prepare_seq2seq(cfg, settings, dialogues)
            jobs += [("seq2seq", m, lambda m, tag: seq2seq.run_model(cfg, bins, m, tag, common_args))
                     for m in cfg.model_list]
    except (FinetuneError, RuntimeError, SystemExit) as e:
        # the data tools' SystemExit carries their one-line error; say it as ours
        message = str(e).removeprefix("fairseq-hash-prepare: error: ")
        print(f"fairseq-hash-finetune: error: {message}", file=sys.stderr)
        return 1
    rows = {task: [] for task in TASKS}
    for i, (task, model, run) in enumerate(jobs, 1):
        tag, start = f"[{i}/{len(jobs)} {task} {model}]", time.time()
        row = run(model, tag)
        summary = (f"test accuracy {_fmt(row['test_accuracy'], 1, pct=True)}" if task == "classify"
                   else f"valid ppl {_fmt(row['valid_ppl'])}, test BLEU {_fmt(row['test_bleu'])}")
        rows[task].append(timed(row, start, tag, summary))
        # rewritten after every model, so an interrupted run keeps what it has
        write_results(cfg.output_dir, rows["classify"], rows["seq2seq"], settings)
    if not cfg.keep_checkpoints:  # kept until now: upcycled starts from dense's
        for prefix in ("", "s2s-"):
            for model in cfg.model_list:
                run_dir = os.path.join(cfg.output_dir, "runs", prefix + model)
                for sub in ("pretrain", "finetune"):
                    shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
                if os.path.exists(os.path.join(run_dir, "upcycled.pt")):
                    os.remove(os.path.join(run_dir, "upcycled.pt"))
    print(open(os.path.join(cfg.output_dir, "results.md"), encoding="utf-8").read())
    return 0 if all(r["ok"] for task in rows.values() for r in task) else 1


def prepare_classification(cfg, settings, lines, labels):
    """The classification data-bin (built or given); fills its settings."""
    if cfg.data_bin:
        cls_bin, task = os.path.abspath(cfg.data_bin), f"--data-bin {cfg.data_bin}"
    else:
        if cfg.text:
            task = f"--text {cfg.text} --labels {cfg.labels}"
        else:
            print("reading the built-in corpus (docstrings of Python's standard library) ...", flush=True)
            lines, labels = package_lines(cfg.classes)
            task = ("which standard-library package a docstring paragraph documents: "
                    + ", ".join(dict.fromkeys(labels)))
        print("preparing classification data (sentencepiece, fairseq-preprocess) ...", flush=True)
        cls_bin = os.path.abspath(build_data(cfg.output_dir, lines, labels, cfg.vocab_size,
                                             cfg.valid_pct, cfg.test_pct))
    settings.update(task=task, classes=label_count(cls_bin), chance=majority_share(cls_bin),
                    split_sizes="/".join(str(n) for n in split_sizes(cls_bin).values()),
                    data=cls_bin)
    return cls_bin


def prepare_seq2seq(cfg, settings, dialogues):
    """The next-utterance data-bins of both stages; fills their settings."""
    print("preparing next-utterance data (sentencepiece, fairseq-preprocess) ...", flush=True)
    packages = list(dict.fromkeys(package_lines(cfg.classes)[1]))
    pre, fine = seq2seq.builtin_conversations(packages)
    if dialogues:
        pre, fine = pre + fine, dialogues
        settings["dialogues"] = (f"fine-tuning on --dialogues {cfg.dialogues}, pretraining on the "
                                 "built-in corpus (one module's docstring a conversation)")
    else:
        settings["dialogues"] = ("the built-in corpus, one module's docstring paragraphs a "
                                 "conversation; fine-tuning on the modules of " + ", ".join(packages)
                                 + ", pretraining on all others")
    bins = seq2seq.build_data(cfg.output_dir, {"pretrain": pre, "finetune": fine}, cfg.vocab_size,
                              cfg.valid_pct, cfg.test_pct)
    for stage, data_bin in bins.items():
        settings[f"s2s_{stage}_sizes"] = "/".join(
            str(seq2seq.pair_count(data_bin, split)) for split in SPLITS)
        settings[f"s2s_{stage}_data"] = data_bin
    return bins


if __name__ == "__main__":
    sys.exit(main())
