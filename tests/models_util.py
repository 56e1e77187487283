"""Helpers of the encoder-decoder and masked-LM tests: tiny data, models built in process."""
import os
import random

import torch

from conftest import run, tool, write_corpus

# a hash_transformer small enough to train a few dozen updates in seconds
TINY_SEQ2SEQ = [
    "--task", "translation", "--arch", "hash_transformer_tiny",
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--hash-experts", "4",
    "--encoder-hash-layer", "0,-1", "--decoder-hash-layer", "0,-1", "--max-tokens", "1024",
]

TINY_ROBERTA = [
    "--arch", "hash_roberta", "--encoder-layers", "2", "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--hash-experts", "4",
    "--encoder-hash-layer", "0,-1", "--max-positions", "64", "--max-tokens", "1024",
]


def next_utterance_pairs(raw):
    """src/tgt files per split: each line of a write_corpus split -> the line after it."""
    for split in ("train", "valid", "test"):
        with open(os.path.join(raw, f"{split}.txt")) as f:
            lines = f.read().splitlines()
        with open(os.path.join(raw, f"{split}.src"), "w") as src, \
                open(os.path.join(raw, f"{split}.tgt"), "w") as tgt:
            for a, b in zip(lines, lines[1:]):
                src.write(a + "\n")
                tgt.write(b + "\n")


def seq2seq_data(folder, lines=400):
    """A preprocessed next-utterance task with separate source and target dictionaries."""
    raw = write_corpus(os.path.join(folder, "raw"), lines=lines)
    next_utterance_pairs(raw)
    dest = os.path.join(folder, "data-bin")
    run([tool("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         *[a for split in ("train", "valid", "test")
           for a in (f"--{split}pref", os.path.join(raw, split))],
         "--destdir", dest, "--workers", "1"])
    return dest


def build_in_process(argv):
    """A model built by fairseq's own parser and task from ``argv``; returns (model, task)."""
    import fairseq_hash  # noqa: F401  (registers the architectures)
    from fairseq import options, tasks

    args = options.parse_args_and_arch(options.get_training_parser(), list(map(str, argv)))
    torch.manual_seed(args.seed)
    task = tasks.setup_task(args)
    return task.build_model(args), task


def seq2seq_model(data_bin, *extra):
    model, task = build_in_process([data_bin, *TINY_SEQ2SEQ, "--dropout", "0", "--cpu", *extra])
    return model.eval(), task


def sentences(dictionary, lengths, seed=0):
    """Token rows ending with end-of-sentence, as the translation task feeds the encoder."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        row = torch.randint(dictionary.nspecial, len(dictionary), (n,), generator=gen)
        row[-1] = dictionary.eos()
        rows.append(row)
    return rows


def classification_data(folder, pretrain_dict, n=600, vocab=40, seed=0):
    """sentence_prediction data whose label is learnable: the half of the vocabulary
    the first word comes from; every sentence is otherwise random words."""
    rng = random.Random(seed)
    raw = os.path.join(folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, count in (("train", n), ("valid", n // 5)):
        with open(os.path.join(raw, f"{split}.input0"), "w") as x, \
                open(os.path.join(raw, f"{split}.label"), "w") as y:
            for _ in range(count):
                first = rng.randrange(vocab)
                words = [first] + [rng.randrange(vocab) for _ in range(rng.randint(3, 9))]
                x.write(" ".join(f"w{i}" for i in words) + "\n")
                y.write(("low" if first < vocab // 2 else "high") + "\n")
    data = os.path.join(folder, "cls-bin")
    for field, extra in (("input0", ["--srcdict", pretrain_dict]), ("label", [])):
        run([tool("fairseq-preprocess"), "--only-source", "--trainpref",
             os.path.join(raw, f"train.{field}"), "--validpref", os.path.join(raw, f"valid.{field}"),
             "--destdir", os.path.join(data, field), "--workers", "1", *extra])
    return data

