"""How every tool of ours ends on bad input: one line, ``fairseq-hash-NAME: error: ...``.

    @command("fairseq-hash-compare")
    def main(argv=None):
        ...
        raise HashConfigError("--experts 1: expected integers >= 2")

Bad input raises the plugin's one error class,
:class:`~fairseq_hash.errors.HashConfigError`, wherever it is found: in the
tool, in the data tools it calls, or in the plugin under it (a model that
cannot be built, a table for another dictionary). ``command`` prints it as one
line on stderr, naming the tool, and returns exit status 2, as argparse does
for a bad flag. Every other exception keeps its traceback: that is a bug, not
bad input. Unlike :func:`~fairseq_hash.errors.install_excepthook` (for
fairseq's own tools), this changes nothing process-wide, so ``main`` behaves
the same when a test or another tool calls it.
"""
import functools
import sys

from ..errors import config_error


def command(prog: str):
    """Decorate a tool's ``main(argv=None)``: our errors -> one line naming ``prog``, status 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except Exception as exc:
                ours = config_error(exc)
                if ours is None:
                    raise
                print(f"{prog}: error: {ours}", file=sys.stderr)
                return 2
        return run
    return wrap
