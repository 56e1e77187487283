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
        # fairseq's trainer re-raises load errors as a plain Exception whose
        # cause is ours; the cause is what the user needs to read
        cause = exc
        while cause is not None and not isinstance(cause, HashConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            print(f"fairseq-hash: error: {cause}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._fairseq_hash = True
    sys.excepthook = hook
