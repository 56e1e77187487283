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
  with ``masked_lm``, fine-tuned with ``sentence_prediction``, scored by test
  accuracy; see finetune_classify.py.
- ``seq2seq``: fairseq's ``transformer`` (``hash_transformer``, hash layers on
  both sides) on the next-utterance task, scored by perplexity and BLEU; see
  finetune_seq2seq.py.

What both share (the training flags, upcycling) is in finetune_stages.py. Logs stay in
``OUTPUT/runs/NAME/``; the results go to ``OUTPUT/results.md``,
``OUTPUT/results.json`` and ``OUTPUT/curves.png``.
"""
import argparse
import logging
import os
import shutil
import sys
import time

from ...errors import HashConfigError
from ..command import command
from . import finetune_classify as classify
from . import finetune_seq2seq as seq2seq
from .finetune_stages import SPLITS
from .options import (add_width_flags, check_positive, check_widths, fill_presets,
                      parse_names, preset_flags)
from .results import figure, fmt, settings_line, write_json

# the models of both tasks (each task's MODELS says how fairseq-train builds them)
MODELS = tuple(classify.MODELS)
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
    add = preset_flags(p.add_argument_group(
        "sizes (defaults in brackets: tiny preset, default preset)"), PRESETS)
    add("--classes", type=int,
        help="built-in task: how many standard-library packages to tell apart "
        "(also seq2seq's fine-tuning domain)")
    add("--vocab-size", type=int, help="sentencepiece vocabulary size")
    add("--layers", type=int, help="encoder layers (and decoder layers of the "
        "seq2seq models)")
    add_width_flags(add)
    add("--experts", type=int, help="K, experts of each hash layer")
    add("--hash-layer", help="0-based encoder (and seq2seq decoder) layers whose "
        "FFN is hashed (comma-separated, negative from the end)")
    add("--max-positions", type=int,
        help="longest input in tokens; longer sentences are truncated")
    add("--max-tokens", type=int, help="tokens in each batch")
    add("--pretrain-updates", type=int, help="pretraining updates of each model")
    add("--finetune-updates", type=int, help="fine-tuning updates of each model")
    add("--validate-every", type=int, help="updates between validations")
    add("--lr", type=float, help="peak learning rate of pretraining (Adam)")
    add("--finetune-lr", type=float, help="peak learning rate of fine-tuning (Adam)")
    add("--warmup-updates", type=int, help="updates of linear learning-rate warm-up")
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
    return p


def resolve(args):
    """Fill the flags left unset from the preset and check them."""
    fill_presets(args, PRESETS)
    args.model_list = parse_names("--models", args.models, MODELS)
    if "upcycled" in args.model_list and "dense" not in args.model_list:
        raise HashConfigError(f"--models {args.models!r}: upcycled fine-tunes dense's pretrained "
                              "model; add dense")
    args.model_list.sort(key=list(MODELS).index)  # dense is pretrained before it is upcycled
    args.task_list = parse_names("--tasks", args.tasks, TASKS)
    check_positive(args, ("classes", "layers", "max_positions", "max_tokens", "pretrain_updates",
                          "finetune_updates", "validate_every", "warmup_updates", "vocab_size"))
    if args.experts < 2:
        raise HashConfigError(f"--experts {args.experts}: must be at least 2")
    check_widths(args)
    if args.max_tokens < args.max_positions:
        raise HashConfigError(f"--max-tokens {args.max_tokens} must be at least --max-positions "
                              f"{args.max_positions}")
    if bool(args.text) != bool(args.labels):
        raise HashConfigError("--text and --labels go together: give both, or neither")
    for flag in ("text", "labels", "dialogues"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise HashConfigError(f"--{flag} {path}: no such file")
    if args.data_bin:
        for field in ("input0", "label"):
            for name in ("dict.txt", *[f"{s}.idx" for s in SPLITS]):
                if not os.path.isfile(os.path.join(args.data_bin, field, name)):
                    raise HashConfigError(
                        f"--data-bin {args.data_bin}: no {field}/{name}; give a folder of "
                        "input0/ and label/, each made by fairseq-preprocess --only-source with "
                        "train, valid and test splits")
    return args


@command("fairseq-hash-finetune")
def main(argv=None):
    cfg = resolve(build_parser().parse_args(argv))
    lines, labels = classify.read_labelled(cfg.text, cfg.labels) if cfg.text else (None, None)
    dialogues = seq2seq.read_dialogues(cfg.dialogues) if cfg.dialogues else None
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
    jobs = []
    if "classify" in cfg.task_list:
        cls_bin = classify.prepare_data(cfg, settings, lines, labels)
        classes = settings["classes"]
        jobs += [("classify", m, lambda m, tag: classify.run_model(cfg, cls_bin, m, classes, tag))
                 for m in cfg.model_list]
    if "seq2seq" in cfg.task_list:
        packages = list(dict.fromkeys(classify.package_lines(cfg.classes)[1]))
        bins = seq2seq.prepare_data(cfg, settings, dialogues, packages)
        jobs += [("seq2seq", m, lambda m, tag: seq2seq.run_model(cfg, bins, m, tag))
                 for m in cfg.model_list]
    rows = {task: [] for task in TASKS}
    for i, (task, model, run) in enumerate(jobs, 1):
        tag, start = f"[{i}/{len(jobs)} {task} {model}]", time.time()
        row = run(model, tag)
        summary = (f"test accuracy {fmt(row['test_accuracy'], 1, pct=True)}" if task == "classify"
                   else f"valid ppl {fmt(row['valid_ppl'])}, test BLEU {fmt(row['test_bleu'])}")
        rows[task].append(timed(row, start, tag, summary))
        # rewritten after every model, so an interrupted run keeps what it has
        write_results(cfg.output_dir, rows["classify"], rows["seq2seq"], settings)
    if not cfg.keep_checkpoints:  # kept until now: upcycled starts from dense's
        remove_checkpoints(cfg)
    print(open(os.path.join(cfg.output_dir, "results.md"), encoding="utf-8").read())
    return 0 if all(r["ok"] for task in rows.values() for r in task) else 1


def timed(row, start, tag, summary):
    row["seconds"] = round(time.time() - start, 1)
    print(f"{tag} done in {row['seconds']:.0f}s: {summary}", flush=True)
    return row


# ---------------------------------------------------------------- results

def write_results(out_dir, rows, s2s_rows, settings):
    write_json(os.path.join(out_dir, "results.json"),
               {"settings": settings, "rows": rows, "seq2seq_rows": s2s_rows})
    lines = ["# fairseq-hash-finetune", ""]
    if "classify" in settings["tasks"]:
        lines += classify.table(rows, settings)
    if "seq2seq" in settings["tasks"]:
        lines += seq2seq.table(s2s_rows, settings)
    lines += [
        f"One seed ({settings['seed']}): differences smaller than another seed would move them cannot "
        "be told apart (run again with --seed).",
        "",
        "curves.png: validation accuracy and perplexity during fine-tuning.",
        "",
        settings_line(settings, leave_out=("task", "split_sizes", "dialogues", "s2s_pretrain_sizes",
                                           "s2s_finetune_sizes")),
        "",
    ]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_curves(os.path.join(out_dir, "curves.png"), rows, s2s_rows, settings["chance"])


def write_curves(path, rows, s2s_rows, chance):
    panels = [p for p in ((rows, "validation accuracy", "sentence_prediction"),
                          (s2s_rows, "validation perplexity", "next utterance (seq2seq)"))
              if any(r["curve"] for r in p[0])]
    with figure(path, max(1, len(panels)), height=4) as axes:
        for ax, (panel, ylabel, title) in zip(axes, panels):
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


def remove_checkpoints(cfg):
    """Every run's checkpoints (the logs and results stay)."""
    for prefix in ("", "s2s-"):
        for model in cfg.model_list:
            run_dir = os.path.join(cfg.output_dir, "runs", prefix + model)
            for sub in ("pretrain", "finetune"):
                shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
            if os.path.exists(os.path.join(run_dir, "upcycled.pt")):
                os.remove(os.path.join(run_dir, "upcycled.pt"))


if __name__ == "__main__":
    sys.exit(main())
