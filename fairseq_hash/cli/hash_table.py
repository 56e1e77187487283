"""``fairseq-hash-table``: build a hash table file for ``--hash-file``.

    fairseq-hash-table clustered --checkpoint dense/checkpoint_best.pt --experts 16 --output c.json
    fairseq-hash-table dispersed --checkpoint dense/checkpoint_best.pt --experts 16 --output d.json
    fairseq-hash-table balanced --data data-bin --experts 16 --output b.json
    fairseq-hash-table dispersed --checkpoint dense/checkpoint_best.pt --experts 16 --topk 2 --output d2.json
    fairseq-hash-table fingerprint --data data-bin

``clustered`` and ``dispersed`` run k-means over the checkpoint's input
embeddings (``decoder.embed_tokens.weight``, one row per dictionary symbol);
the dictionary is ``--data``'s dict.txt, or the data the checkpoint was
trained on. Every other type is built from the dictionary alone, as training
would build it with ``--hash-seed``. The file format is in
``fairseq_hash/table_file.py`` and ``docs/hash_tables.md``.
"""
import argparse
import os
import sys

from ..embedding_tables import embedding_table
from ..errors import HashConfigError
from ..hashing import HASH_REGISTRY, build_hash_function, expected_load, token_counts
from ..table_file import fingerprint_hex, save_table_file
from .command import command

EMBEDDING_KEY = "decoder.embed_tokens.weight"


def load_dictionary(data):
    from fairseq.data import Dictionary

    path = os.path.join(data, "dict.txt")
    if not os.path.isfile(path):
        raise HashConfigError(f"--data {data}: no dict.txt there; give a fairseq data-bin folder")
    return Dictionary.load(path)


def checkpoint_embeddings(path):
    """Input embeddings ``[V, d]`` and the training data folder of a checkpoint."""
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise HashConfigError(f"--checkpoint {path}: no such file")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    weights = state.get("model", {})
    if EMBEDDING_KEY not in weights:
        raise HashConfigError(
            f"--checkpoint {path}: no {EMBEDDING_KEY} in its model; give a checkpoint of a "
            f"fairseq language model (transformer_lm or hash_transformer_lm)"
        )
    cfg = state.get("cfg") or {}
    data = cfg.get("task", {}).get("data") if hasattr(cfg, "get") else None
    return weights[EMBEDDING_KEY].float(), data


def build(args):
    """The table ``[R, N * columns]`` and its dictionary for parsed ``args``."""
    fn = build_hash_function(args.type, args.experts)
    if args.type in ("clustered", "dispersed"):
        if not args.checkpoint:
            raise HashConfigError(f"{args.type} tables need --checkpoint (a trained model)")
        embeddings, trained_on = checkpoint_embeddings(args.checkpoint)
        data = args.data or trained_on
        if not data:
            raise HashConfigError(f"--checkpoint {args.checkpoint} names no data folder; give --data")
        dictionary = load_dictionary(data)
        if embeddings.size(0) != len(dictionary):
            raise HashConfigError(
                f"--checkpoint {args.checkpoint} has {embeddings.size(0)} embeddings but "
                f"{data}/dict.txt has {len(dictionary)} symbols; give the --data it was trained on"
            )
        if args.clusters is not None and args.clusters < 1:
            raise HashConfigError(f"--clusters {args.clusters}: must be at least 1")
        table = embedding_table(args.type, embeddings, token_counts(dictionary), args.experts,
                                args.hashes, args.seed, args.clusters, args.topk)
        source = f"k-means over {EMBEDDING_KEY} of {args.checkpoint}"
    else:
        if not args.data:
            raise HashConfigError(f"{args.type} tables need --data (a data-bin folder)")
        dictionary = load_dictionary(args.data)
        if args.topk > 1:
            table = fn.build_topk_table(dictionary, args.experts, args.topk, args.seed)
        else:
            table = fn.build_table(dictionary, args.experts, args.hashes, args.seed)
        source = f"{args.type} over {args.data}/dict.txt, seed {args.seed}"
    if args.topk > 1:
        return table, dictionary, source + f", {args.topk} experts a token"
    return table, dictionary, source + f", {args.hashes} hash(es)"


def make_table(argv=None):
    """``fairseq-hash-table`` as a function: writes the table; bad input raises HashConfigError."""
    parser = argparse.ArgumentParser(prog="fairseq-hash-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("type", choices=sorted(HASH_REGISTRY) + ["fingerprint"],
                        help="hash type of the table; 'fingerprint' prints the fingerprint "
                        "of --data's dictionary that a table file must record")
    parser.add_argument("--experts", type=int, help="number of experts K (--hash-experts)")
    parser.add_argument("--output", help="table file to write (JSON)")
    parser.add_argument("--checkpoint", help="trained fairseq LM checkpoint whose input "
                        "embeddings are clustered (clustered, dispersed)")
    parser.add_argument("--data", help="data-bin folder whose dict.txt the table is for "
                        "(default for clustered/dispersed: the checkpoint's training data)")
    parser.add_argument("--hashes", type=int, default=1,
                        help="number of hashes N, for --hash-count N (default 1)")
    parser.add_argument("--topk", type=int, default=1,
                        help="distinct experts per token k, for --hash-topk k (default 1; not "
                        "with --hashes)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of random tables and k-means (hash m uses seed + m; default 1)")
    parser.add_argument("--clusters", type=int, default=None,
                        help="k-means clusters (default: --experts); clustered maps cluster c "
                        "to expert c mod K")
    args = parser.parse_args(argv)
    if args.type == "fingerprint":
        if not args.data:
            raise HashConfigError("fingerprint needs --data (a data-bin folder)")
        print(fingerprint_hex(load_dictionary(args.data)))
        return
    if args.experts is None or args.experts < 2:
        raise HashConfigError(f"--experts {args.experts}: give the number of experts, at least 2")
    if args.hashes < 1:
        raise HashConfigError(f"--hashes {args.hashes}: must be at least 1")
    if not 1 <= args.topk <= args.experts or (args.topk > 1 and args.hashes > 1):
        raise HashConfigError(f"--topk {args.topk}: must lie in [1, --experts {args.experts}], "
                              f"and --hashes must be 1 with --topk above 1")
    if not args.output:
        raise HashConfigError("--output FILE is required")
    table, dictionary, source = build(args)
    save_table_file(args.output, table, args.type, args.experts, dictionary, source, args.topk)
    fn = HASH_REGISTRY[args.type]
    if fn.token_rows and fn.columns_per_hash == 1:
        share = expected_load(table, token_counts(dictionary), args.experts)
        print("expected load max/mean per hash: "
              + ", ".join(f"{float(s.max()) * args.experts:.3f}" for s in share), file=sys.stderr)
    print(args.output)


@command("fairseq-hash-table")
def main(argv=None):
    make_table(argv)


if __name__ == "__main__":
    sys.exit(main())
