"""fairseq-generate with beam search: sentences per second of a hash and a dense seq2seq model.

    python -m fairseq_hash.cli.bench.generate DATA_BIN                # a data-bin of src/tgt pairs
    python -m fairseq_hash.cli.bench.generate DATA_BIN --experts 16 --repeats 3 --json out.json

DATA_BIN is a translation data-bin (``fairseq-hash-prepare --next-utterance``
makes one from the built-in corpus). The script trains a dense ``transformer``
and a ``hash_transformer`` of the same shape (hash layers: the last encoder and
the last decoder layer) for ``--updates`` updates from the same seed, then runs
``fairseq-generate`` on the test split with ``--beam`` and every hypothesis
forced to ``--length`` tokens (``--min-len`` = ``--max-len-b``), so that both
models decode exactly as many steps. It prints each model's best sentences/s
over ``--repeats`` runs (from fairseq-generate's own "Translated ..." line) and
the ratio hash/dense.
"""
import argparse
import os
import re
import tempfile

from ..fairseq_runner import run_fairseq
from ..user_dir import user_dir
from .options import add_json_flag, write_json

SPEED = re.compile(r"Translated ([0-9,]+) sentences .* \(([0-9.]+) sentences/s")


def model_flags(args, hashed):
    flags = ["--arch", "hash_transformer" if hashed else "transformer",
             "--encoder-layers", str(args.layers), "--decoder-layers", str(args.layers),
             "--encoder-embed-dim", str(args.embed_dim), "--decoder-embed-dim", str(args.embed_dim),
             "--encoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-ffn-embed-dim",
             str(args.ffn_dim), "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
    if hashed:
        flags += ["--encoder-hash-layer", "-1", "--decoder-hash-layer", "-1",
                  "--hash-experts", str(args.experts)]
    return flags


def train(args, hashed, save):
    run_fairseq("fairseq-train", [
        args.data_bin, "--user-dir", user_dir(), "--task", "translation",
        *model_flags(args, hashed), "--optimizer", "adam", "--lr", "0.0005", "--max-tokens", "4096",
        "--max-update", args.updates, "--cpu", "--seed", "1", "--num-workers", "0",
        "--save-dir", save, "--no-epoch-checkpoints", "--disable-validation"],
        os.path.join(save, "train.log")).checked()
    return os.path.join(save, "checkpoint_last.pt")


def generate(args, ckpt):
    run = run_fairseq("fairseq-generate", [
        args.data_bin, "--user-dir", user_dir(), "--path", ckpt,
        "--gen-subset", "test", "--beam", args.beam, "--min-len", args.length,
        "--max-len-a", "0", "--max-len-b", args.length, "--batch-size", args.batch_size,
        "--cpu", "--num-workers", "0", "--quiet"],
        os.path.join(os.path.dirname(ckpt), "generate.log")).checked()
    match = SPEED.search("".join(run.lines))
    return int(match.group(1).replace(",", "")), float(match.group(2))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_hash.cli.bench.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("data_bin", help="a translation data-bin (src/tgt)")
    parser.add_argument("--experts", type=int, default=16, help="experts per hash layer (16)")
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers (3)")
    parser.add_argument("--embed-dim", type=int, default=256, help="model width (256)")
    parser.add_argument("--ffn-dim", type=int, default=1024, help="FFN width (1024)")
    parser.add_argument("--updates", type=int, default=20, help="training updates (20)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (5)")
    parser.add_argument("--length", type=int, default=24, help="tokens a hypothesis (24)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences a batch (32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model; the best counts (3)")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hashed in (("dense", False), ("hash", True)):
            ckpt = train(args, hashed, os.path.join(tmp, name))
            runs = [generate(args, ckpt) for _ in range(args.repeats)]
            rows.append({"model": name, "sentences": runs[0][0],
                         "sentences_per_s": max(r[1] for r in runs),
                         "all_runs": [r[1] for r in runs]})
    dense = rows[0]["sentences_per_s"]
    print(f"fairseq-generate, beam {args.beam}, {args.length} tokens a hypothesis, batch "
          f"{args.batch_size}; {args.layers}+{args.layers} layers, d={args.embed_dim}, "
          f"f={args.ffn_dim}, K={args.experts} (last encoder and decoder layer)")
    print(f"{'model':<8}{'sentences':>10}{'sent/s (best)':>15}{'ratio':>8}  runs")
    for row in rows:
        row["ratio"] = row["sentences_per_s"] / dense
        print(f"{row['model']:<8}{row['sentences']:>10}{row['sentences_per_s']:>15.2f}"
              f"{row['ratio']:>8.2f}  {', '.join(f'{r:.2f}' for r in row['all_runs'])}")
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
