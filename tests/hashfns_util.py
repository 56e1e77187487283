"""Helpers of the hash-function tests: tiny dictionaries, models and checkpoints."""
import os
import random
import subprocess
import sys

import torch
from fairseq.data import Dictionary

BIN = os.path.dirname(sys.executable)


def hashfns_dictionary(n=40):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}", n=1000 // (i + 1) + 1)
    return d


def hashfns_data_dir(folder, n=40):
    """A folder holding only dict.txt: enough to build a language model."""
    os.makedirs(folder, exist_ok=True)
    d = hashfns_dictionary(n)
    d.save(os.path.join(folder, "dict.txt"))
    return folder


def hashfns_model(data_dir, *extra, layers=2, embed=16, ffn=32, experts=4):
    """A hash_transformer_lm built by fairseq's own parser and task, in eval mode."""
    import fairseq_hash  # noqa: F401  (registers the architecture)
    from fairseq import options, tasks

    parser = options.get_training_parser()
    argv = [data_dir, "--task", "language_modeling", "--arch", "hash_transformer_lm",
            "--decoder-layers", str(layers), "--decoder-embed-dim", str(embed),
            "--decoder-ffn-embed-dim", str(ffn), "--decoder-attention-heads", "2",
            "--hash-experts", str(experts), "--dropout", "0", "--cpu",
            "--tokens-per-sample", "64", *map(str, extra)]
    args = options.parse_args_and_arch(parser, argv)
    torch.manual_seed(args.seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    return model.eval(), task.dictionary


def hashfns_tokens(dictionary, batch=3, length=9, seed=0):
    """Sequences that start with end-of-sentence, as generation feeds them ``[B, T]``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=gen)
    tokens[:, 0] = dictionary.eos()
    return tokens


def hashfns_run(args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [os.path.join(BIN, args[0]), *map(str, args[1:])]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def hashfns_corpus(folder, lines=300, vocab=60, seed=0):
    """A small preprocessed corpus (data-bin) of Zipf words with local structure."""
    raw = os.path.join(folder, "raw")
    dest = os.path.join(folder, "data-bin")
    if os.path.isfile(os.path.join(dest, "dict.txt")):
        return dest
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(vocab)]
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 10), ("test", lines // 10)):
        with open(os.path.join(raw, f"{split}.txt"), "w") as f:
            for _ in range(n):
                w = rng.choices(range(vocab), weights)[0]
                sent = [w]
                for _ in range(rng.randint(4, 12)):
                    w = (w + 1) % vocab if rng.random() < 0.6 else rng.choices(range(vocab), weights)[0]
                    sent.append(w)
                f.write(" ".join(f"v{i}" for i in sent) + "\n")
    hashfns_run(["fairseq-preprocess", "--only-source", "--task", "language_modeling",
                 "--trainpref", os.path.join(raw, "train.txt"),
                 "--validpref", os.path.join(raw, "valid.txt"),
                 "--testpref", os.path.join(raw, "test.txt"), "--destdir", dest, "--workers", "1"])
    return dest


def hashfns_user_dir():
    import fairseq_hash

    return os.path.dirname(fairseq_hash.__file__)


HASHFNS_TINY = ["--task", "language_modeling", "--arch", "hash_transformer_lm",
                "--decoder-layers", "2", "--decoder-embed-dim", "32",
                "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
                "--hash-experts", "4", "--tokens-per-sample", "32", "--max-tokens", "512",
                "--optimizer", "adam", "--lr", "0.005", "--cpu", "--num-workers", "0",
                "--seed", "3", "--no-epoch-checkpoints", "--dropout", "0.0"]


def hashfns_train(data, save_dir, *extra, updates=8):
    """Train a tiny LM for a few updates (once: reused if its checkpoint exists)."""
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.isfile(ckpt):
        hashfns_run(["fairseq-train", data, "--user-dir", hashfns_user_dir(), *HASHFNS_TINY,
                     "--max-update", updates, "--save-dir", save_dir, *extra])
    return ckpt


def hashfns_multihash_checkpoint(basetemp, corpus):
    """A tiny bigram MultiHash (N=2) LM on both layers, trained once per test session."""
    return hashfns_train(corpus, os.path.join(str(basetemp), "hashfns_multihash"),
                         "--hash-type", "bigram", "--hash-count", 2, "--hash-layer", "0,1",
                         updates=3)
