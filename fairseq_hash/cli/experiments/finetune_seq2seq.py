"""The next-utterance task of ``fairseq-hash-finetune``: seq2seq pretraining, fine-tuning, BLEU.

Following the paper's dialogue experiments (pretrain on one body of
conversations, fine-tune on a smaller one), every model is a fairseq
``transformer`` (``dense``) or ``hash_transformer`` (``hash``, hash layers on
both sides) of one shape. Each is trained to answer a line with the line after
it on the pretraining conversations, then fine-tuned with
``--finetune-from-model`` on the fine-tuning conversations. ``upcycled`` is the
dense pretrained checkpoint turned into a hash one by ``fairseq-hash-upcycle``
and fine-tuned alike. The result of a model is its fine-tuning run's last
validation perplexity and the BLEU of ``fairseq-generate --beam 5`` on the
fine-tuning test split.

The conversations: with ``--dialogues FILE`` (one turn a line, a blank line
between conversations) the model fine-tunes on those and pretrains on the
whole built-in corpus. Without it, the built-in corpus is cut in two: a
module's docstring paragraphs are one conversation, and the modules of the
classification task's packages are the fine-tuning domain, all others the
pretraining one.
"""
import os
import re
import shutil

from ...errors import HashConfigError
from ..data.corpus import builtin_corpus_items, encode_file, train_sentencepiece
from ..data.next_utterance import next_utterance_pairs, read_conversations, write_pair_splits
from ..fairseq_runner import device_flags, run_fairseq
from ..user_dir import user_dir
from .finetune_stages import SPLITS, common_args, starting_point
from .results import fmt, markdown_table, recorded_path

MODELS = {
    "dense": ["--arch", "transformer"],
    "hash": ["--arch", "hash_transformer", "--hash-type", "balanced"],
    "upcycled": ["--arch", "hash_transformer", "--hash-type", "balanced"],
}
STAGES = ("pretrain", "finetune")
_BLEU_LINE = re.compile(r"Generate test with beam=\d+: BLEU = ([\d.]+)")
_TRANSLATED_LINE = re.compile(r"Translated ([\d,]+) sentences")


def builtin_conversations(packages):
    """``(pretraining, fine-tuning)`` conversations of the built-in corpus.

    A conversation is one module's docstring paragraphs in order; the modules of
    ``packages`` (top-level names) are fine-tuning's, the rest pretraining's.
    """
    by_module = {}
    for name, line in builtin_corpus_items():
        by_module.setdefault(name, []).append(line)
    pre, fine = [], []
    for name, turns in by_module.items():
        (fine if name.split(".")[0] in packages else pre).append(turns)
    return pre, fine


def build_data(out_dir, conversations, vocab_size, valid_pct, test_pct):
    """OUTPUT/data/s2s-{pretrain,finetune}: next-utterance data-bins with one dictionary.

    ``conversations`` maps each stage to its conversations. One sentencepiece
    model is trained on both stages' training pairs, and the fine-tuning
    data-bin reuses the pretraining one's joined dictionary, so a pretrained
    checkpoint fits the fine-tuning data.
    """
    data = os.path.join(out_dir, "data")
    bins = {stage: os.path.join(data, f"s2s-{stage}") for stage in STAGES}
    if all(os.path.isfile(os.path.join(b, "dict.src.txt")) for b in bins.values()):
        return bins
    raw = {stage: os.path.join(data, "s2s-raw", stage) for stage in STAGES}
    counts = {}
    for stage in STAGES:
        counts[stage] = write_pair_splits(next_utterance_pairs(conversations[stage]), raw[stage],
                                          valid_pct, test_pct)
    both = os.path.join(data, "s2s-raw", "train.both")
    with open(both, "w", encoding="utf-8") as f:
        for stage in STAGES:
            for side in ("src", "tgt"):
                with open(os.path.join(raw[stage], f"train.{side}"), encoding="utf-8") as part:
                    f.write(part.read())
    sp = train_sentencepiece(both, os.path.join(data, "s2s-spm"), vocab_size)
    for stage in STAGES:
        os.makedirs(os.path.join(raw[stage], "spm"), exist_ok=True)
        for split in counts[stage]:
            for side in ("src", "tgt"):
                encode_file(sp, os.path.join(raw[stage], f"{split}.{side}"),
                            os.path.join(raw[stage], "spm", f"{split}.{side}"))
        dictionary = (["--joined-dictionary"] if stage == "pretrain" else
                      ["--srcdict", os.path.join(bins["pretrain"], "dict.src.txt"),
                       "--tgtdict", os.path.join(bins["pretrain"], "dict.tgt.txt")])
        tmp = bins[stage] + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run_fairseq("fairseq-preprocess", [
            "--source-lang", "src", "--target-lang", "tgt", *dictionary,
            *[a for s in SPLITS
              for a in (f"--{s}pref", os.path.join(raw[stage], "spm", s))],
            "--destdir", tmp, "--workers", "1"],
            os.path.join(data, f"preprocess_s2s_{stage}.log")).checked()
        os.replace(tmp, bins[stage])  # a half-written data-bin is never left behind
    return bins


def read_dialogues(path):
    """Conversations of a ``--dialogues`` file, or a one-line error naming it."""
    conversations = read_conversations([path])
    if not next_utterance_pairs(conversations):
        raise HashConfigError(f"--dialogues {path}: no conversation of two turns or more; give one turn "
                              "a line and a blank line between conversations")
    return conversations


# ---------------------------------------------------------------- runs

def shape_args(cfg, model):
    args = [*MODELS[model], "--share-all-embeddings",
            "--max-source-positions", cfg.max_positions, "--max-target-positions", cfg.max_positions]
    for side in ("encoder", "decoder"):
        args += [f"--{side}-layers", cfg.layers, f"--{side}-embed-dim", cfg.embed_dim,
                 f"--{side}-ffn-embed-dim", cfg.ffn_dim, f"--{side}-attention-heads", cfg.heads]
    if model != "dense":
        args += ["--hash-experts", cfg.experts, "--encoder-hash-layer", cfg.hash_layer,
                 "--decoder-hash-layer", cfg.hash_layer]
    return args


def train_args(cfg, data_bin, model, lr, updates, save_dir):
    return [str(a) for a in [
        data_bin, "--user-dir", user_dir(), "--task", "translation", "--source-lang", "src",
        "--target-lang", "tgt", "--truncate-source", "--skip-invalid-size-inputs-valid-test",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.0",
        *shape_args(cfg, model), *common_args(cfg, lr, updates), "--save-dir", save_dir]]


def generate_args(cfg, data_bin, checkpoint):
    return [str(a) for a in [
        data_bin, "--user-dir", user_dir(), "--path", checkpoint, "--gen-subset", "test",
        "--source-lang", "src", "--target-lang", "tgt", "--truncate-source",
        "--skip-invalid-size-inputs-valid-test", "--beam", "5", "--max-len-a", "0",
        "--max-len-b", cfg.max_positions, "--batch-size", "32", "--post-process", "sentencepiece",
        "--scoring", "sacrebleu", "--seed", cfg.seed, *device_flags()]]


def generated(run):
    """``(BLEU, sentences decoded)`` of a fairseq-generate run (None where it printed none)."""
    bleu = [float(m.group(1)) for m in map(_BLEU_LINE.search, run.lines) if m]
    count = [int(m.group(1).replace(",", "")) for m in map(_TRANSLATED_LINE.search, run.lines) if m]
    return (bleu[-1] if bleu else None), (count[-1] if count else None)


def run_model(cfg, bins, model, tag):
    """Pretrain (or upcycle), fine-tune and decode one seq2seq model; returns its row."""
    run_dir = os.path.join(cfg.output_dir, "runs", f"s2s-{model}")
    os.makedirs(run_dir, exist_ok=True)
    row = {"model": model, "experts": None if model == "dense" else cfg.experts, "ok": False,
           "pretrain_valid_ppl": None, "valid_ppl": None, "test_bleu": None, "test_sentences": None,
           "total_params": None, "curve": []}
    checkpoint, pre = starting_point(
        cfg, run_dir, os.path.join(cfg.output_dir, "runs", "s2s-dense"), model, tag,
        "next-utterance", ["--encoder-hash-layer", "--decoder-hash-layer"],
        lambda save_dir: train_args(cfg, bins["pretrain"], model, cfg.lr, cfg.pretrain_updates,
                                    save_dir))
    valid = [r for r in pre.records("valid") if "valid_ppl" in r] if pre else []
    row["pretrain_valid_ppl"] = valid[-1]["valid_ppl"] if valid else None
    if checkpoint is None:
        return row
    fine_dir = os.path.join(run_dir, "finetune")
    print(f"{tag} next-utterance fine-tuning, {cfg.finetune_updates} updates", flush=True)
    fine = run_fairseq("fairseq-train", [
        *train_args(cfg, bins["finetune"], model, cfg.finetune_lr, cfg.finetune_updates, fine_dir),
        "--finetune-from-model", checkpoint],
        os.path.join(run_dir, "finetune.log"))
    params = fine.parameters()
    if params["shared"] is not None:
        row["total_params"] = params["shared"] + params["expert"]
    row["curve"] = [(int(r["valid_num_updates"]), r["valid_ppl"])
                    for r in fine.records("valid") if "valid_ppl" in r]
    row["valid_ppl"] = row["curve"][-1][1] if row["curve"] else None
    tuned = os.path.join(fine_dir, "checkpoint_last.pt")
    if not fine.ok or not os.path.exists(tuned):
        print(f"{tag} fine-tuning failed: {fine.last_line()}; see {fine.log_path}", flush=True)
        return row
    print(f"{tag} fairseq-generate --beam 5 on the test split", flush=True)
    gen = run_fairseq("fairseq-generate", generate_args(cfg, bins["finetune"], tuned),
                      os.path.join(run_dir, "generate.log"))
    row["test_bleu"], row["test_sentences"] = generated(gen)
    if not gen.ok or row["test_bleu"] is None:
        print(f"{tag} generation failed: {gen.last_line()}; see {gen.log_path}", flush=True)
    else:
        row["ok"] = True
    return row


def table(rows, settings):
    """The next-utterance section of results.md."""
    return [
        "## Next utterance: seq2seq pretraining and fine-tuning", "",
        *markdown_table(
            ["model", "experts", "total params", "pretraining valid ppl", "fine-tuning valid ppl",
             "test BLEU (beam 5)", "test pairs decoded"],
            [[f"{r['model']}{'' if r['ok'] else ' (failed)'}", r["experts"] or "-",
              fmt(r["total_params"]), fmt(r["pretrain_valid_ppl"]), fmt(r["valid_ppl"]),
              fmt(r["test_bleu"]), fmt(r["test_sentences"])] for r in rows]),
        "",
        f"Conversations: {settings['dialogues']}; pairs (line, next line) "
        f"train/valid/test: pretraining {settings['s2s_pretrain_sizes']}, fine-tuning "
        f"{settings['s2s_finetune_sizes']}.", "",
        "Perplexities are fairseq-train's last validation of each stage (per "
        "sentencepiece token). BLEU is sacrebleu's, from fairseq-generate --beam 5 on the "
        "fine-tuning test split after the last update, sentencepiece removed; pairs "
        "whose target is longer than --max-positions are skipped (the sources are "
        "truncated), so the last column counts the pairs scored.", "",
    ]


def pair_count(data_bin, split):
    """Sentence pairs of one split of a translation data-bin."""
    from fairseq.data import data_utils

    return len(data_utils.load_indexed_dataset(os.path.join(data_bin, f"{split}.src-tgt.src"), None))


def prepare_data(cfg, settings, dialogues, packages):
    """The next-utterance data-bins of both stages; fills their settings."""
    print("preparing next-utterance data (sentencepiece, fairseq-preprocess) ...", flush=True)
    pre, fine = builtin_conversations(packages)
    if dialogues:
        pre, fine = pre + fine, dialogues
        settings["dialogues"] = (f"fine-tuning on --dialogues {cfg.dialogues}, pretraining on the "
                                 "built-in corpus (one module's docstring a conversation)")
    else:
        settings["dialogues"] = ("the built-in corpus, one module's docstring paragraphs a "
                                 "conversation; fine-tuning on the modules of " + ", ".join(packages)
                                 + ", pretraining on all others")
    bins = build_data(cfg.output_dir, {"pretrain": pre, "finetune": fine}, cfg.vocab_size,
                      cfg.valid_pct, cfg.test_pct)
    for stage, data_bin in bins.items():
        settings[f"s2s_{stage}_sizes"] = "/".join(
            str(pair_count(data_bin, split)) for split in SPLITS)
        settings[f"s2s_{stage}_data"] = recorded_path(data_bin, cfg.output_dir)
    return bins
