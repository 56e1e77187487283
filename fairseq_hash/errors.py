"""One-line errors for bad flags, files and checkpoints.

fairseq's command-line tools print a full traceback for any exception. For
mistakes in *input* (a flag out of range, a table built for another
dictionary) a user needs the one line that says what is wrong, so errors of
this type are printed alone by :func:`install_excepthook`.
"""
import sys


class HashConfigError(ValueError):
    """Bad input: names the flag or file at fault and what would be valid."""


def install_excepthook():
    previous = sys.excepthook
    if getattr(previous, "_fairseq_hash", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, HashConfigError):
            print(f"fairseq-hash: error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._fairseq_hash = True
    sys.excepthook = hook
