"""``fairseq-hash-prepare``: text files -> sentencepiece -> fairseq data-bin.

    fairseq-hash-prepare --output-dir work/data                 # built-in corpus
    fairseq-hash-prepare --text a.txt b.txt --output-dir work/data

With no ``--text`` it writes the built-in corpus (corpus.py: the docstrings of
Python's standard library, one paragraph a line). Lines are split into train,
valid and test by a hash of their text, so adding files never reshuffles old
lines. The result, ``OUTPUT/data-bin``, is what ``fairseq-train`` reads.
``--next-utterance`` builds a seq2seq task instead (next_utterance.py).
"""
import argparse
import logging
import os
import sys

from ...errors import HashConfigError
from ..command import command
from ..fairseq_runner import run_fairseq
from .corpus import builtin_corpus_lines, encode_file, read_text_files, split_of, train_sentencepiece

logger = logging.getLogger("fairseq_hash.prepare")


def write_splits(lines, raw_dir, valid_pct, test_pct):
    os.makedirs(raw_dir, exist_ok=True)
    files = {s: open(os.path.join(raw_dir, f"{s}.txt"), "w", encoding="utf-8")
             for s in ("train", "valid", "test")}
    counts = dict.fromkeys(files, 0)
    for line in lines:
        split = split_of(line, valid_pct, test_pct)
        files[split].write(line + "\n")
        counts[split] += 1
    for f in files.values():
        f.close()
    for split, n in counts.items():
        if n == 0:
            raise HashConfigError(f"the {split} split is empty; give more text (--text) or "
                                  "change --valid-pct/--test-pct")
    return counts


def prepare(output_dir, text=None, vocab_size=2000, valid_pct=5.0, test_pct=5.0,
            max_lines=0, workers=2):
    """Build OUTPUT/{raw,spm,data-bin}; returns the data-bin path."""
    data_bin = os.path.join(output_dir, "data-bin")
    if os.path.exists(os.path.join(data_bin, "dict.txt")):
        logger.info(f"{data_bin} exists; reusing it (delete it to rebuild)")
        return data_bin
    lines = read_text_files(text) if text else builtin_corpus_lines(max_lines)
    if max_lines:
        lines = lines[:max_lines]
    raw = os.path.join(output_dir, "raw")
    counts = write_splits(lines, raw, valid_pct, test_pct)
    logger.info(f"corpus: {len(lines)} lines -> " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sp = train_sentencepiece(os.path.join(raw, "train.txt"), os.path.join(output_dir, "spm"),
                             vocab_size)
    for split in counts:
        encode_file(sp, os.path.join(raw, f"{split}.txt"), os.path.join(raw, f"{split}.spm"))
    tmp = data_bin + ".tmp"
    run_fairseq("fairseq-preprocess", [
        "--only-source", "--task", "language_modeling",
        "--trainpref", os.path.join(raw, "train.spm"),
        "--validpref", os.path.join(raw, "valid.spm"),
        "--testpref", os.path.join(raw, "test.spm"),
        "--destdir", tmp, "--workers", workers], os.path.join(output_dir, "preprocess.log")).checked()
    os.replace(tmp, data_bin)  # a half-written data-bin is never left behind
    return data_bin


@command("fairseq-hash-prepare")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help="plain text files, one sentence or paragraph a line "
                        "(default: the built-in corpus of Python docstrings)")
    parser.add_argument("--output-dir", required=True,
                        help="folder for raw/, spm.model and data-bin/")
    parser.add_argument("--vocab-size", type=int, default=2000,
                        help="sentencepiece vocabulary size (default 2000)")
    parser.add_argument("--valid-pct", type=float, default=5.0,
                        help="percent of lines held out for validation (default 5)")
    parser.add_argument("--test-pct", type=float, default=5.0,
                        help="percent of lines held out for test (default 5)")
    parser.add_argument("--max-lines", type=int, default=0,
                        help="use at most this many lines (default 0: all)")
    parser.add_argument("--workers", type=int, default=2,
                        help="fairseq-preprocess worker processes (default 2)")
    parser.add_argument("--next-utterance", action="store_true",
                        help="build a seq2seq task instead: each line -> the line after it "
                        "(blank lines separate conversations), for --task translation "
                        "--source-lang src --target-lang tgt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    build = prepare
    if args.next_utterance:
        from .next_utterance import prepare_next_utterance as build
    path = build(args.output_dir, args.text, args.vocab_size, args.valid_pct, args.test_pct,
                 args.max_lines, args.workers)
    print(path)


if __name__ == "__main__":
    sys.exit(main())
