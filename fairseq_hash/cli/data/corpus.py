"""The text the data tools start from: the built-in corpus, the split rule, sentencepiece.

    builtin_corpus_items()            # [(module name, paragraph), ...] of the standard library
    split_of(line, 5.0, 5.0)          # "train", "valid" or "test", by a hash of the line
    sp = train_sentencepiece("train.txt", "out/spm", 2000); encode_file(sp, "a.txt", "a.spm")

The built-in corpus needs no download: the docstrings of Python's standard
library modules, one paragraph a line, deterministic for a given Python
version. Lines are split by a hash of their text, so adding files never
reshuffles old lines.
"""
import hashlib
import importlib
import inspect
import os
import pkgutil
import re
import sys
import warnings

from ...errors import HashConfigError

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
            raise HashConfigError(f"--text {path}: no such file")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(" ".join(l.split()) for l in f if l.strip())
    return lines
