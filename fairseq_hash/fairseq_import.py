"""Stop at import, in one line, when no usable fairseq is installed.

fairseq-hash does not require one fairseq distribution: fairseq installed from
its source (distribution ``fairseq``) and ``fairseq-fixed`` (PyPI, fairseq's
main branch) both provide the module ``fairseq``. fairseq 0.12.2 from PyPI
installs but does not import on Python 3.11, so what is checked is the import.
"""

INSTALL_HINT = ("pip install 'fairseq-hash[fairseq]' (adds fairseq-fixed, which imports on "
                "Python 3.11), or install fairseq from its source")


def require_fairseq():
    try:
        from fairseq.models import transformer_lm  # noqa: F401  (what our models extend)
    except Exception as err:  # ImportError, or fairseq 0.12.2's ValueError on Python 3.11
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ImportError(f"fairseq-hash needs fairseq, which does not import here ({reason}); "
                          f"{INSTALL_HINT}") from None
