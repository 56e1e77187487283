"""The seq2seq half of ``fairseq-hash-finetune``: next-utterance pretraining, fine-tuning, BLEU.

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

from .fairseq_runner import device_flags, run_fairseq
from .next_utterance import next_utterance_pairs, read_conversations, write_pair_splits
from .prepare import encode_file, train_sentencepiece
from .user_dir import user_dir

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
    from .prepare import builtin_corpus_items

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
        done = run_fairseq("fairseq-preprocess", [
            "--source-lang", "src", "--target-lang", "tgt", *dictionary,
            *[a for s in ("train", "valid", "test")
              for a in (f"--{s}pref", os.path.join(raw[stage], "spm", s))],
            "--destdir", tmp, "--workers", "1"], os.path.join(data, f"preprocess_s2s_{stage}.log"))
        if not done.ok:
            raise RuntimeError(f"fairseq-preprocess failed ({done.last_line()}); see {done.log_path}")
        os.replace(tmp, bins[stage])  # a half-written data-bin is never left behind
    return bins


def read_dialogues(path):
    """Conversations of a ``--dialogues`` file, or a one-line error naming it."""
    conversations = read_conversations([path])
    if not next_utterance_pairs(conversations):
        raise ValueError(f"--dialogues {path}: no conversation of two turns or more; give one turn "
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


def train_args(cfg, data_bin, model, lr, updates, save_dir, common_args):
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


def run_model(cfg, bins, model, tag, common_args):
    """Pretrain (or upcycle), fine-tune and decode one seq2seq model; returns its row."""
    run_dir = os.path.join(cfg.output_dir, "runs", f"s2s-{model}")
    os.makedirs(run_dir, exist_ok=True)
    row = {"model": model, "experts": None if model == "dense" else cfg.experts, "ok": False,
           "pretrain_valid_ppl": None, "valid_ppl": None, "test_bleu": None, "test_sentences": None,
           "total_params": None, "curve": []}
    checkpoint, pre = starting_point(
        cfg, run_dir, os.path.join(cfg.output_dir, "runs", "s2s-dense"), model, tag, "next-utterance", ["--encoder-hash-layer", "--decoder-hash-layer"],
        lambda save_dir: train_args(cfg, bins["pretrain"], model, cfg.lr, cfg.pretrain_updates,
                                    save_dir, common_args))
    valid = [r for r in pre.records("valid") if "valid_ppl" in r] if pre else []
    row["pretrain_valid_ppl"] = valid[-1]["valid_ppl"] if valid else None
    if checkpoint is None:
        return row
    fine_dir = os.path.join(run_dir, "finetune")
    print(f"{tag} next-utterance fine-tuning, {cfg.finetune_updates} updates", flush=True)
    fine = run_fairseq("fairseq-train", [
        *train_args(cfg, bins["finetune"], model, cfg.finetune_lr, cfg.finetune_updates, fine_dir,
                    common_args), "--finetune-from-model", checkpoint],
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


def table(rows, fmt):
    lines = ["| model | experts | total params | pretraining valid ppl | fine-tuning valid ppl "
             "| test BLEU (beam 5) | test pairs decoded |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']}{'' if r['ok'] else ' (failed)'} | {r['experts'] or '-'} "
                     f"| {fmt(r['total_params'])} | {fmt(r['pretrain_valid_ppl'])} "
                     f"| {fmt(r['valid_ppl'])} | {fmt(r['test_bleu'])} | {fmt(r['test_sentences'])} |")
    return lines


def pair_count(data_bin, split):
    """Sentence pairs of one split of a translation data-bin."""
    from fairseq.data import data_utils

    return len(data_utils.load_indexed_dataset(os.path.join(data_bin, f"{split}.src-tgt.src"), None))
