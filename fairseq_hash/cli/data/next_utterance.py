"""A next-utterance seq2seq task (a line -> the line after it) for ``fairseq-hash-prepare``.

    fairseq-hash-prepare --next-utterance --output-dir work/dialogue               # built-in corpus
    fairseq-hash-prepare --next-utterance --text dialogues.txt --output-dir work/dialogue

In a text file, one turn a line and a blank line between conversations: each
turn is a source whose target is the turn after it in the same conversation.
The built-in corpus is read as one conversation of consecutive paragraphs.
Pairs are split into train, valid and test by a hash of the source line; one
sentencepiece model and one joined dictionary serve both sides, and
``OUTPUT/data-bin`` is what ``fairseq-train --task translation`` reads
(``--source-lang src --target-lang tgt``).
"""
import os
from typing import List, Tuple

from ...errors import HashConfigError
from ..fairseq_runner import run_fairseq
from .corpus import builtin_corpus_lines, encode_file, split_of, train_sentencepiece


def read_conversations(paths) -> List[List[str]]:
    """Conversations (lists of turns) from files; a blank line ends a conversation."""
    conversations = []
    for path in paths:
        if not os.path.isfile(path):
            raise HashConfigError(f"--text {path}: no such file")
        turns = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = " ".join(line.split())
                if line:
                    turns.append(line)
                elif turns:
                    conversations.append(turns)
                    turns = []
        if turns:
            conversations.append(turns)
    return conversations


def next_utterance_pairs(conversations) -> List[Tuple[str, str]]:
    return [(a, b) for turns in conversations for a, b in zip(turns, turns[1:])]


def write_pair_splits(pairs, raw_dir, valid_pct, test_pct):
    os.makedirs(raw_dir, exist_ok=True)
    counts = {}
    files = {(s, side): open(os.path.join(raw_dir, f"{s}.{side}"), "w", encoding="utf-8")
             for s in ("train", "valid", "test") for side in ("src", "tgt")}
    for src, tgt in pairs:
        split = split_of(src, valid_pct, test_pct)
        files[split, "src"].write(src + "\n")
        files[split, "tgt"].write(tgt + "\n")
        counts[split] = counts.get(split, 0) + 1
    for f in files.values():
        f.close()
    for split in ("train", "valid", "test"):
        if not counts.get(split):
            raise HashConfigError(f"the {split} split has no pair; give "
                                  f"more conversations or change --valid-pct/--test-pct")
    return counts


def prepare_next_utterance(output_dir, text=None, vocab_size=2000, valid_pct=5.0, test_pct=5.0,
                           max_lines=0, workers=2):
    """Build OUTPUT/{raw,spm,data-bin} of (line, next line) pairs; returns the data-bin path."""
    data_bin = os.path.join(output_dir, "data-bin")
    if os.path.exists(os.path.join(data_bin, "dict.src.txt")):
        return data_bin
    if text:
        conversations = read_conversations(text)
    else:
        conversations = [builtin_corpus_lines(max_lines)]
    pairs = next_utterance_pairs(conversations)
    if max_lines:
        pairs = pairs[:max_lines]
    raw = os.path.join(output_dir, "raw")
    counts = write_pair_splits(pairs, raw, valid_pct, test_pct)
    both = os.path.join(raw, "train.both")
    with open(both, "w", encoding="utf-8") as f:
        for side in ("src", "tgt"):
            with open(os.path.join(raw, f"train.{side}"), encoding="utf-8") as part:
                f.write(part.read())
    sp = train_sentencepiece(both, os.path.join(output_dir, "spm"), vocab_size)
    os.makedirs(os.path.join(raw, "spm"), exist_ok=True)
    for split in counts:
        for side in ("src", "tgt"):
            encode_file(sp, os.path.join(raw, f"{split}.{side}"),
                        os.path.join(raw, "spm", f"{split}.{side}"))
    tmp = data_bin + ".tmp"
    run_fairseq("fairseq-preprocess", [
        "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        *[a for split in ("train", "valid", "test")
          for a in (f"--{split}pref", os.path.join(raw, "spm", split))],
        "--destdir", tmp, "--workers", workers], os.path.join(output_dir, "preprocess.log")).checked()
    os.replace(tmp, data_bin)  # a half-written data-bin is never left behind
    return data_bin
