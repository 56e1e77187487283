"""The classification task of ``fairseq-hash-finetune``: RoBERTa, masked-LM, sentence_prediction.

    cls_bin = prepare_data(cfg, settings, None, None)   # the built-in task's data-bin
    row = run_model(cfg, cls_bin, "hash", classes, "[1/3 classify hash]")
    lines = table(rows, settings)                               # its section of results.md

Every model is fairseq's ``roberta`` (``dense``) or ``hash_roberta`` (``hash``,
``upcycled``) of one shape, pretrained with ``masked_lm`` on the training
split's text, then fine-tuned with ``sentence_prediction``; its accuracy on the
held-out test split is fairseq-train's score of that split after the last
update. With no ``--text``/``--data-bin`` the task is the built-in corpus's
(Python's standard-library docstrings): which package a paragraph documents,
among the ``--classes`` packages with the most paragraphs, each class cut to
the same size so that chance is 1 / classes.
"""
import collections
import logging
import os

from ...errors import HashConfigError
from ..data.corpus import builtin_corpus_items, split_of
from ..data.prepare import prepare
from ..fairseq_runner import run_fairseq
from ..user_dir import user_dir
from .finetune_stages import SPLITS, common_args, starting_point
from .results import fmt, markdown_table, recorded_path

# model name -> fairseq-train arguments that make it
MODELS = {
    "dense": ["--arch", "roberta"],
    "hash": ["--arch", "hash_roberta", "--hash-type", "balanced"],
    # the dense pretrained checkpoint through fairseq-hash-upcycle, then fine-tuned as hash
    "upcycled": ["--arch", "hash_roberta", "--hash-type", "balanced"],
}


# ---------------------------------------------------------------- data

def package_lines(classes):
    """(text lines, labels) of the built-in corpus: which stdlib package a paragraph is from.

    The ``classes`` packages with the most paragraphs, each cut to the smallest one's count.
    """
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
        raise HashConfigError(f"--labels {labels}: {len(names)} lines, but --text {text} has "
                              f"{len(lines)}; give one label a line, aligned with the text")
    pairs = [(l, n) for l, n in zip(lines, names) if l]
    if any(not n or " " in n for _, n in pairs):
        raise HashConfigError(f"--labels {labels}: a label is empty or holds a space; "
                              "give one word a line")
    return [l for l, _ in pairs], [n for _, n in pairs]


def build_data(out_dir, lines, labels, vocab_size, valid_pct, test_pct):
    """OUTPUT/data/cls-bin/{input0,label}: sentencepiece text and labels, split alike."""
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
        run_fairseq("fairseq-preprocess", [
            "--only-source", *[a for s in SPLITS for a in (f"--{s}pref", os.path.join(raw, f"{s}.{suffix}"))],
            "--destdir", os.path.join(tmp, field), "--workers", "1", *extra],
            os.path.join(data, f"preprocess_{field}.log")).checked()
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


def majority_share(cls_bin, split="test"):
    """The largest class's share of a split: the accuracy of always guessing it."""
    from fairseq.data import data_utils

    labels = data_utils.load_indexed_dataset(os.path.join(cls_bin, "label", split), None)
    counts = collections.Counter(int(labels[i][0]) for i in range(len(labels)))
    return max(counts.values()) / len(labels) if labels else None



# ---------------------------------------------------------------- runs

def shape_args(cfg, model):
    args = [*MODELS[model], "--encoder-layers", cfg.layers, "--encoder-embed-dim", cfg.embed_dim,
            "--encoder-ffn-embed-dim", cfg.ffn_dim, "--encoder-attention-heads", cfg.heads,
            "--max-positions", cfg.max_positions]
    if model != "dense":
        args += ["--hash-experts", cfg.experts, "--encoder-hash-layer", cfg.hash_layer]
    return args


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
    checkpoint, pre = starting_point(
        cfg, run_dir, os.path.join(cfg.output_dir, "runs", "dense"), model, tag, "masked-LM",
        ["--encoder-hash-layer"],
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


def prepare_data(cfg, settings, lines, labels):
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
                    data=recorded_path(cfg.data_bin or cls_bin, cfg.output_dir))
    return cls_bin


def table(rows, settings):
    """The classification section of results.md."""
    return [
        "## Classification: masked-LM pretraining, sentence_prediction fine-tuning", "",
        *markdown_table(
            ["model", "experts", "total params", "masked-LM valid loss", "valid accuracy",
             "test accuracy"],
            [[f"{r['model']}{'' if r['ok'] else ' (failed)'}", r["experts"] or "-",
              fmt(r["total_params"]), fmt(r["pretrain_valid_loss"]),
              fmt(r["valid_accuracy"], 1, pct=True), fmt(r["test_accuracy"], 1, pct=True)]
             for r in rows]),
        "",
        f"Task: {settings['task']}; {settings['classes']} classes (chance "
        f"{fmt(settings['chance'], 1, pct=True)}, the largest class's share of the test split); "
        f"sentences train/valid/test {settings['split_sizes']}.",
        "",
        "Masked-LM valid loss is fairseq-train's last validation (base 2) after pretraining; "
        "upcycled starts from dense's pretrained model, so it has none of its own. Valid and test "
        "accuracy are fairseq-train's scores of those splits after the last fine-tuning update.",
        "",
    ]
