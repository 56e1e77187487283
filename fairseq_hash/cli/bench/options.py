"""The flags several benchmarks share: the data they train on, and where their rows go.

    add_data_flags(parser, "--train: ")   # --data-bin DIR, --work-dir DIR
    add_json_flag(parser)                 # --json FILE
    args = parser.parse_args(argv)
    data_bin = prepared_data(args)        # --data-bin, else the built-in corpus in --work-dir
    write_json(args.json, rows)           # nothing without --json
"""
import json
import os
import tempfile

WORK_DIR = os.path.join(tempfile.gettempdir(), "fairseq-hash-bench")


def add_data_flags(parser, when: str = ""):
    """``--data-bin`` and ``--work-dir``; ``when`` starts their help (the mode that reads them)."""
    parser.add_argument("--data-bin", metavar="DIR",
                        help=f"{when}a fairseq language-modelling data-bin (default: the "
                        "built-in corpus, prepared once in --work-dir)")
    parser.add_argument("--work-dir", default=WORK_DIR,
                        help=f"{when}folder for the prepared data and what the runs "
                        "write (default: fairseq-hash-bench in the temporary folder)")


def prepared_data(args) -> str:
    """``--data-bin``, or the built-in corpus prepared in ``--work-dir`` (once: later
    runs reuse it); ``--work-dir`` exists afterwards."""
    os.makedirs(args.work_dir, exist_ok=True)
    if args.data_bin:
        return args.data_bin
    from ..data.prepare import prepare

    return prepare(os.path.join(args.work_dir, "data"))


def add_json_flag(parser):
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results to FILE as JSON")


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
