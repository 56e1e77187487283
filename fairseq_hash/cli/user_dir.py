"""``fairseq-hash-user-dir``: print the path to pass to fairseq's ``--user-dir``.

    fairseq-train data-bin --user-dir "$(fairseq-hash-user-dir)" --arch hash_transformer_lm ...

The path is absolute, so commands and checkpoints that record it work from
any working directory.
"""
import argparse
import importlib.util
import os


def user_dir() -> str:
    spec = importlib.util.find_spec("fairseq_hash")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def main(argv=None):
    argparse.ArgumentParser(prog="fairseq-hash-user-dir",
                            description=__doc__.split("\n\n")[0].strip("`: ")).parse_args(argv)
    print(user_dir())


if __name__ == "__main__":
    main()
