"""One-line errors for bad flags, files and checkpoints.

fairseq's command-line tools print a full traceback for any exception. For
mistakes in *input* (a flag out of range, a table built for another
dictionary) a user needs the one line that says what is wrong, so errors of
this type are printed alone by :func:`install_excepthook`. Every other
exception keeps its traceback, even one raised while ours was being handled:
that is a bug, not bad input.

The hook is a process-wide setting, so it is installed only where this
package runs as a command (:func:`running_as_command`), never by a Python
program that imports it.
"""
import os
import sys
from typing import Optional


class HashConfigError(ValueError):
    """Bad input: names the flag or file at fault and what would be valid."""


def unreadable_checkpoint(path: str, exc: BaseException) -> HashConfigError:
    """The one line for a checkpoint file that cannot be read (cut off by a copy or a
    full disk, or no checkpoint at all): what broke, as the first sentence of
    ``exc`` says it (torch's next ones are advice for its own users)."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
    return HashConfigError(f"{path}: not a readable checkpoint ({reason}); is the file "
                           f"complete? give a checkpoint written by fairseq-train")


def _replaced_by_fairseqs_trainer(exc: BaseException) -> bool:
    """Whether ``exc`` is the plain Exception fairseq's ``Trainer.load_checkpoint``
    raises in place of any error of ``load_state_dict``: it does so inside its
    ``except`` block without ``from``, so the original is only its ``__context__``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (type(exc) is Exception and code is not None and code.co_name == "load_checkpoint"
            and code.co_filename.endswith(os.path.join("fairseq", "trainer.py")))


def config_error(exc: BaseException) -> Optional[HashConfigError]:
    """Our error behind ``exc``: ``exc`` itself, its explicit cause (``raise ...
    from``), or the one fairseq's trainer replaced; None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HashConfigError):
            return exc
        seen.add(id(exc))
        if exc.__cause__ is not None:
            exc = exc.__cause__
        elif _replaced_by_fairseqs_trainer(exc):
            exc = exc.__context__
        else:
            return None
    return None


def running_as_command() -> bool:
    """Whether this process is one of fairseq's command-line tools or ours.

    Console scripts (``fairseq-train``, ``fairseq-eval-lm``, ...,
    ``fairseq-hash-demo``) run with ``sys.argv[0]`` set to the script's path,
    whose name starts with ``fairseq-``; ``python -m fairseq_cli.train`` (or
    ``-m fairseq_hash.cli.demo``) runs with that module as ``__main__``. A
    Python program, notebook or test runner that imports the plugin is
    neither. fairseq's tools import the plugin through ``--user-dir`` while
    parsing flags, before any model is built, so the hook is in place for
    every error of ours, and ``python -m fairseq_hash.cli.X`` imports it
    before anything else.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else None
    if module is None and sys.argv[:1] == ["-m"]:
        # ``python -m fairseq_hash.cli.X`` imports this package before it sets
        # ``__main__``'s spec, while ``sys.argv[0]`` is still "-m"
        argv = getattr(sys, "orig_argv", [])
        module = argv[argv.index("-m", 1) + 1] if "-m" in argv[1:-1] else None
    if module is not None and module.split(".")[0] in ("fairseq_cli", "fairseq_hash"):
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("fairseq-")


def install_excepthook():
    previous = sys.excepthook
    if getattr(previous, "_fairseq_hash", False):
        return

    def hook(exc_type, exc, tb):
        ours = config_error(exc)
        if ours is not None:
            # launched by torchrun (or with its variables), every rank refuses the
            # same flags: rank 0 says it, the others exit with it
            if os.environ.get("RANK", "0") == "0":
                print(f"fairseq-hash: error: {ours}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._fairseq_hash = True
    sys.excepthook = hook
