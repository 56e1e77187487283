"""``fairseq-hash-bench``: a routed FFN sublayer timed beside a dense one, or whole models.

    fairseq-hash-bench                                  # tokens 8192, experts 4,16,64
    fairseq-hash-bench --tokens 2048 8192 --experts 16 --json bench.json
    fairseq-hash-bench --train --experts 16             # whole models through fairseq
    fairseq-hash-bench --ranks 2 --experts 16           # expert-parallel, 2 gloo ranks

The layer mode is in ``layer.py`` (what each implementation is, how time and
memory are measured); the train mode in ``train.py``; the 2-rank modes in
``parallel.py``. Two more benchmarks of this folder run as modules:
``python -m fairseq_hash.cli.bench.generate`` (beam-search speed of a hash and
a dense seq2seq model) and ``python -m fairseq_hash.cli.bench.phases`` (where a
training update spends its time).
"""
import argparse
import logging
import os
import sys
from typing import List

import torch

from ..command import command
from ..tool_env import OPTIMIZER_HELP, TRAIN_OPTIMIZERS
from .layer import print_layer_table, run_layers
from .layer_cases import LAYER_IMPLS
from .options import add_data_flags, add_json_flag, write_json
from .parallel import run_ranks
from .train import print_train_table, run_train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-bench",
                                     description="Time a routed FFN sublayer (hash, naive, "
                                     "fairscale, learned routers) beside a dense FFN, or "
                                     "whole-model training through fairseq-train (--train).")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="S",
                        help="tokens per step: layer mode times each S (default 8192); "
                        "with --train, the first is fairseq's --max-tokens (default 2048)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], metavar="K",
                        help="numbers of experts to compare (default 4 16 64)")
    parser.add_argument("--embed-dim", type=int, default=512,
                        help="model width d of the FFN sublayer (default 512)")
    parser.add_argument("--ffn-dim", type=int, default=2048,
                        help="hidden width f of the dense FFN and of every expert (default 2048)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of weights and activations in layer mode (default float32)")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cpu or cuda or cuda:1 (default cpu)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds after one warm-up (layer mode; default 5) or "
                        "rounds of training runs, every model once a round (--train; default 5)")
    parser.add_argument("--impls", nargs="+", default=list(LAYER_IMPLS), choices=LAYER_IMPLS,
                        help="implementations to time (default: all); --train runs dense and "
                        "those of hash, switch, top2, base named here")
    parser.add_argument("--optimizer", nargs="+", default=["adam"], choices=TRAIN_OPTIMIZERS,
                        help="--train: fairseq optimizers to train with, every model with each: "
                        f"{OPTIMIZER_HELP} (default adam)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads for every implementation "
                        f"(default {torch.get_num_threads()}, torch's default here)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory pass (peak_mb, act_mb) of layer mode")
    add_json_flag(parser)
    parser.add_argument("--train", action="store_true",
                        help="measure whole-model training words/s through fairseq-train "
                        "instead of one layer")
    parser.add_argument("--layers", type=int, default=6,
                        help="--train: decoder layers; the last one is the hash layer (default 6)")
    parser.add_argument("--updates", type=int, default=12,
                        help="--train: updates per run (default 12)")
    parser.add_argument("--warmup-updates", type=int, default=3,
                        help="--train: first updates left out of the speed (default 3)")
    add_data_flags(parser, "--train: ")
    parser.add_argument("--ranks", type=int, default=1,
                        help="2 or 4: expert parallelism on that many gloo processes: the "
                        "layer (alltoall, fairscale's MOELayer, one process), or with --train "
                        "fairseq-train's words/s of the hash LM expert-parallel and the dense "
                        "LM data-parallel; first --experts and --tokens only (default 1)")
    parser.add_argument("--counts", action="store_true",
                        help="with --ranks: time one all-gather of every hash layer's "
                        "expert counts against one a layer (--layers of them)")
    parser.add_argument("--wire", action="store_true",
                        help="with --ranks 2: rows the expert-parallel exchange sends per step "
                        "at P = 2, 4, 8 ranks (counted from simulated routing, no processes): "
                        "padded all-to-all before and now, and the exact-split exchange")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if min(args.experts) < 1:
        parser.error("--experts must be positive")
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    args.train_tokens = args.tokens[0] if args.tokens else 2048
    return args


def run(argv=None) -> List[dict]:
    """Run the benchmark as the command line would; return its rows."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | "
                        "%(message)s")
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.ranks > 1:
        rows = run_ranks(args)
    elif args.train:
        rows = run_train(args, device)
        print_train_table(rows)
    else:
        rows = run_layers(args, device, dtype)
        print_layer_table(rows)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device {device}, dtype {args.dtype}, threads {args.threads}, "
          f"d {args.embed_dim}, f {args.ffn_dim}; load average (1, 5, 15 min) before "
          f"{load and tuple(round(x, 2) for x in load)}, after "
          f"{load_after and tuple(round(x, 2) for x in load_after)}")
    write_json(args.json, rows)
    return rows


@command("fairseq-hash-bench")
def main(argv=None):
    run(argv)


if __name__ == "__main__":
    sys.exit(main())
