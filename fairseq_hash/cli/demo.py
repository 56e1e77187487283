"""``fairseq-hash-demo`` (``bash run/demo.sh``): the project's main job, end to end.

    bash run/demo.sh                       # built-in corpus, a few minutes on CPU
    bash run/demo.sh my.txt other.txt      # the same on your own text files

Builds a corpus (the docstrings of Python's standard library unless text files
are given), trains sentencepiece, binarises with ``fairseq-preprocess``, trains
a small hash-layer LM with ``fairseq-train``, scores the test split with
``fairseq-eval-lm``, samples a few lines through fairseq's hub interface and
prints where everything was written. Every step is a fairseq command that is
also written to ``commands.sh`` in the output folder, to rerun or adapt.
"""
import argparse
import logging
import os
import sys
import time

from ..errors import HashConfigError
from .command import command
from .fairseq_runner import run_fairseq, shell_line
from .data.prepare import prepare
from .tool_env import OPTIMIZER_HELP, TRAIN_OPTIMIZERS
from .user_dir import user_dir

PROMPTS = ["Return the", "This module provides", "If the"]


def run_logged(tool, args, log_path, commands_file):
    """Run a fairseq tool, writing it to ``commands.sh`` and its progress to the console."""
    commands_file.write(shell_line(tool, args) + "\n")
    commands_file.flush()
    print(f"\n$ {shell_line(tool, args)}\n", flush=True)

    def show(line):
        if "| {'_name'" not in line and any(k in line for k in (  # not the config dump
                "train_inner", "| valid |", "| train |", "hash", "Loss", "done training",
                "Saved checkpoint", "num. model params", "rror")):
            sys.stdout.write(line)

    return run_fairseq(tool, args, log_path, show).checked()


def mean_wps(train):
    """Mean of fairseq's train_inner words/s, leaving out the first interval (warm-up)."""
    values = [r["wps"] for r in train.records("train_inner")]
    values = values[1:] or values or [  # runs shorter than one log interval
        r["train_wps"] for r in train.records("train")]
    return sum(values) / len(values) if values else None


def updates_done(train):
    counts = [r["num_updates"] for r in train.records("train_inner")]
    counts += [r["train_num_updates"] for r in train.records("train")]
    return int(max(counts)) if counts else None


def model_flags(args, arch):
    flags = ["--task", "language_modeling", "--arch", arch,
             "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
             "--decoder-input-dim", str(args.embed_dim), "--decoder-output-dim", str(args.embed_dim),
             "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-attention-heads", "4",
             "--share-decoder-input-output-embed", "--tokens-per-sample", "128",
             "--dropout", "0.1"]
    if arch.startswith("hash_"):
        flags += ["--hash-layer", args.hash_layer, "--hash-experts", str(args.experts),
                  "--hash-type", args.hash_type]
    return flags


def train_flags(args, save_dir):
    return ["--optimizer", args.optimizer, "--adam-betas", "(0.9, 0.98)", "--lr", "0.002",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "1.0",
            "--max-tokens", "2048", "--max-update", str(args.max_update),
            *(["--stop-time-hours", f"{args.minutes / 60:.4f}"] if args.minutes else []),
            "--validate-interval-updates", "200",
            "--save-interval-updates", "200", "--keep-interval-updates", "1",
            "--no-epoch-checkpoints", "--log-interval", "25", "--log-format", "json",
            "--seed", str(args.seed), "--num-workers", "0", "--save-dir", save_dir,
            *(["--cpu"] if args.cpu else [])]


def sample(save_dir, data_bin, spm_model, n_prompts, out_path):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    import fairseq_hash  # noqa: F401  (registers hash_transformer_lm)

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # its config dump is pages long
    hub = TransformerLanguageModel.from_pretrained(
        save_dir, "checkpoint_best.pt", data_bin, bpe="sentencepiece",
        sentencepiece_model=spm_model,
    ).eval()
    lines = []
    for prompt in PROMPTS[:n_prompts]:
        text = hub.sample(prompt, beam=1, sampling=True, sampling_topk=20, temperature=0.8,
                          max_len_b=40, seed=1)
        lines.append(text)
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


@command("fairseq-hash-demo")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("text", nargs="*", help="text files to train on (default: the built-in "
                        "corpus of Python docstrings)")
    parser.add_argument("--output-dir", default="outputs/demo",
                        help="where data, checkpoints, logs and samples go (default outputs/demo)")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="training time budget in minutes (default 3)")
    parser.add_argument("--max-update", type=int, default=5000,
                        help="stop after this many updates if the time budget lasts (default 5000)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--embed-dim", type=int, default=256, help="model width d (default 256)")
    parser.add_argument("--ffn-dim", type=int, default=1024, help="FFN width f (default 1024)")
    parser.add_argument("--experts", type=int, default=8, help="experts per hash layer (default 8)")
    parser.add_argument("--hash-layer", default="-1",
                        help="decoder layers with a hash FFN, as fairseq-train's --hash-layer (default -1)")
    parser.add_argument("--hash-type", default="balanced",
                        help="hash function, as fairseq-train's --hash-type (default balanced)")
    parser.add_argument("--vocab-size", type=int, default=2000,
                        help="sentencepiece vocabulary size (default 2000)")
    parser.add_argument("--seed", type=int, default=1, help="fairseq --seed (default 1)")
    parser.add_argument("--optimizer", choices=TRAIN_OPTIMIZERS, default="adam",
                        help=f"fairseq optimizer: {OPTIMIZER_HELP} (default adam)")
    parser.add_argument("--samples", type=int, default=3, help="lines to sample (default 3, max 3)")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also train the same model with no hash layer (fairseq's "
                        "transformer_lm) for as many updates, and print both words per second")
    parser.add_argument("--gpu", dest="cpu", action="store_false",
                        help="train on the GPU (default: CPU)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.output_dir)
    save_dir = os.path.join(out, "checkpoints")
    if os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
        raise HashConfigError(f"{save_dir} already holds a trained model; choose another "
                              "--output-dir or delete it")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    print(f"[1/4] corpus, sentencepiece and fairseq-preprocess -> {out}/data", flush=True)
    data_bin = prepare(os.path.join(out, "data"), args.text or None, vocab_size=args.vocab_size)
    with open(os.path.join(out, "commands.sh"), "w") as commands:
        print(f"[2/4] fairseq-train, about {args.minutes:g} minutes", flush=True)
        train = run_logged("fairseq-train", [data_bin, "--user-dir", user_dir(),
                                             *model_flags(args, "hash_transformer_lm"),
                                             *train_flags(args, save_dir)],
                           os.path.join(out, "train.log"), commands)
        print("[3/4] fairseq-eval-lm on the test split", flush=True)
        scored = run_logged("fairseq-eval-lm", [data_bin, "--user-dir", user_dir(), "--path",
                                                os.path.join(save_dir, "checkpoint_best.pt"),
                                                "--gen-subset", "test", "--tokens-per-sample", "128",
                                                "--max-tokens", "4096", "--num-workers", "0",
                                                *(["--cpu"] if args.cpu else [])],
                            os.path.join(out, "eval_test.log"), commands)
        dense_wps = None
        if args.compare_dense:
            dense_args = argparse.Namespace(**{**vars(args), "minutes": 0,
                                               "max_update": updates_done(train) or args.max_update})
            print(f"[3b] the same model without hash layers, {dense_args.max_update} updates", flush=True)
            # fairseq's own model; --user-dir only for --optimizer fused_adamw
            dense = run_logged("fairseq-train", [data_bin, "--user-dir", user_dir(),
                                                 *model_flags(args, "transformer_lm"),
                                                 *train_flags(dense_args,
                                                              os.path.join(out, "checkpoints_dense"))],
                               os.path.join(out, "train_dense.log"), commands)
            dense_wps = mean_wps(dense)
    print("[4/4] samples through the hub interface", flush=True)
    samples = sample(save_dir, data_bin, os.path.join(out, "data", "spm.model"), args.samples,
                     os.path.join(out, "samples.txt"))
    ppl = scored.eval_lm_perplexity()
    wps = mean_wps(train)
    print("\n" + "=" * 72)
    for line in samples:
        print(f"  sample: {line}")
    print(f"test perplexity (fairseq-eval-lm): {ppl if ppl is not None else '?'}")
    if wps:
        print(f"training words per second (fairseq's train_inner wps, mean after the first): {wps:.0f}")
    if dense_wps:
        print(f"  the same model without hash layers: {dense_wps:.0f} (hash/dense {wps / dense_wps:.2f})")
    print(f"written to {out}/:")
    for name, what in [("data/data-bin", "binarised data and dict.txt"),
                       ("data/spm.model", "sentencepiece model"),
                       ("checkpoints", "checkpoint_best.pt, checkpoint_last.pt"),
                       ("train.log", "fairseq-train output"), ("eval_test.log", "fairseq-eval-lm output"),
                       ("samples.txt", "sampled lines"), ("commands.sh", "the fairseq commands run")]:
        print(f"  {name:<16} {what}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
