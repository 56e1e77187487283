"""fairseq's own checkpoint objects load under torch's weights-only default."""
import io
import subprocess
import sys

import torch


def test_a_fairseq_config_and_namespace_load_weights_only_once_the_plugin_is_imported():
    import fairseq_hash.safe_globals as safe_globals

    safe_globals.check_roundtrip()  # raises if torch refuses a type


def test_without_the_plugin_torch_refuses_them():
    # the failure the allow-list exists for: a fresh interpreter without fairseq_hash
    code = ("import io, argparse, torch\n"
            "b = io.BytesIO(); torch.save({'args': argparse.Namespace(arch='x')}, b); b.seek(0)\n"
            "torch.load(b)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "argparse.Namespace" in proc.stderr


def test_anything_else_is_still_refused():
    import fairseq_hash  # noqa: F401

    from fractions import Fraction

    buffer = io.BytesIO()
    torch.save({"x": Fraction(1, 3)}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer)
    except Exception as e:  # weights-only unpickling error
        assert "Unsupported global" in str(e)
    else:
        raise AssertionError("an unlisted class was unpickled")
