"""``fairseq-hash-prepare``: text files -> sentencepiece -> fairseq data-bin.

    fairseq-hash-prepare --output-dir work/data                 # built-in corpus
    fairseq-hash-prepare --text a.txt b.txt --output-dir work/data

With no ``--text`` it writes a built-in corpus that needs no download: the
docstrings of Python's standard library modules, one paragraph a line,
deterministic for a given Python version. Lines are split into train, valid
and test by a hash of their text, so adding files never reshuffles old lines.
The result, ``OUTPUT/data-bin``, is what ``fairseq-train`` reads.
"""
import argparse
import hashlib
import importlib
import inspect
import logging
import os
import pkgutil
import re
import sys
import warnings

from .fairseq_runner import run_fairseq

logger = logging.getLogger("fairseq_hash.prepare")

# Modules whose import has side effects (opens windows, prints, starts things).
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data",
         "lib2to3", "ensurepip", "venv", "test", "__main__", "xxsubtype"}


def builtin_corpus_lines(max_lines: int = 0):
    """Paragraphs of the standard library's docstrings, in a fixed order."""
    return [line for _, line in builtin_corpus_items(max_lines)]


def builtin_corpus_items(max_lines: int = 0):
    """``(module name, paragraph)`` of the standard library's docstrings, in a fixed order."""
    top = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    names = [n for n in top if not n.startswith("_") and n not in _SKIP]
    seen, items = set(), []
    while names:
        name = names.pop(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:
            continue
        if hasattr(module, "__path__"):  # a package: its submodules follow it
            subs = sorted(m.name for m in pkgutil.iter_modules(module.__path__, name + "."))
            names[:0] = [n for n in subs if ".test" not in n and "._" not in n]
        objects = [module] + [
            obj for _, obj in sorted(vars(module).items(), key=lambda kv: kv[0])
            if (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == name
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                line = " ".join(para.split())
                if len(line.split()) >= 4 and line not in seen:
                    seen.add(line)
                    items.append((name, line))
        if max_lines and len(items) >= max_lines:
            break
    return items[:max_lines] if max_lines else items


def split_of(line: str, valid_pct: float, test_pct: float) -> str:
    bucket = int(hashlib.md5(line.encode("utf-8")).hexdigest()[:8], 16) % 10000 / 100.0
    if bucket < valid_pct:
        return "valid"
    if bucket < valid_pct + test_pct:
        return "test"
    return "train"


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
            raise SystemExit(f"fairseq-hash-prepare: error: the {split} split is empty; "
                             f"give more text (--text) or change --valid-pct/--test-pct")
    return counts


def train_sentencepiece(train_txt, prefix, vocab_size):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=train_txt, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=2,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def encode_file(sp, src, dst):
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(" ".join(sp.encode(line.strip(), out_type=str)) + "\n")


def read_text_files(paths):
    lines = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"fairseq-hash-prepare: error: --text {path}: no such file")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(" ".join(l.split()) for l in f if l.strip())
    return lines


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
    done = run_fairseq("fairseq-preprocess", [
        "--only-source", "--task", "language_modeling",
        "--trainpref", os.path.join(raw, "train.spm"),
        "--validpref", os.path.join(raw, "valid.spm"),
        "--testpref", os.path.join(raw, "test.spm"),
        "--destdir", tmp, "--workers", workers], os.path.join(output_dir, "preprocess.log"))
    if not done.ok:
        raise SystemExit(f"fairseq-hash-prepare: error: fairseq-preprocess failed "
                         f"({done.last_line()}); see {done.log_path}")
    os.replace(tmp, data_bin)  # a half-written data-bin is never left behind
    return data_bin


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
    main()
