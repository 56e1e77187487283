"""Import fairseq as this package needs it: check it works, undo its import-time noise.

fairseq-hash does not require one fairseq distribution: fairseq installed from
its source (distribution ``fairseq``) and ``fairseq-fixed`` (PyPI, fairseq's
main branch) both provide the module ``fairseq``. fairseq 0.12.2 from PyPI
installs but does not import on Python 3.11, so what is checked is the import.
"""
import logging
import warnings

INSTALL_HINT = ("pip install 'fairseq-hash[fairseq]' (adds fairseq-fixed, which imports on "
                "Python 3.11), or install fairseq from its source")


def import_fairseq():
    """Import fairseq's models, or stop with one line that says what to install."""
    # fairscale 0.4.13 calls torch.cuda.amp functions that torch 2.13 deprecates,
    # and fairseq's text-to-speech task asks for tensorboardX, on import
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairscale\.")
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from fairseq.models import transformer_lm  # noqa: F401  (what our models extend)
    except Exception as err:  # ImportError, or fairseq 0.12.2's ValueError on Python 3.11
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ImportError(f"fairseq-hash needs fairseq, which does not import here ({reason}); "
                          f"{INSTALL_HINT}") from None
    # fairseq/models/wav2vec/wav2vec2_classification.py calls
    # logging.basicConfig(level=logging.DEBUG) on import, so where nothing had
    # configured logging yet, every library's debug lines (matplotlib's) would
    # print; fairseq's command-line tools configure logging first and keep theirs
    if not handlers:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.setLevel(level)
