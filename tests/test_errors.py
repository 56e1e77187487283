"""The short form of our errors: only our own, only in fairseq's commands and ours."""
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, run, user_dir
from fairseq_hash import errors
from fairseq_hash.errors import HashConfigError


@pytest.fixture
def hook(monkeypatch):
    """Our hook installed over Python's default one, for this test only."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    errors.install_excepthook()
    return sys.excepthook


def raised(make):
    try:
        make()
    except BaseException as e:  # noqa: B902 - the test inspects whatever was raised
        return e
    raise AssertionError("nothing was raised")


def report(hook, exc, capsys):
    hook(type(exc), exc, exc.__traceback__)
    return capsys.readouterr().err


def bad_flag():
    raise HashConfigError("--hash-experts 1: must be at least 2")


def test_our_error_prints_one_line(hook, capsys):
    err = report(hook, raised(bad_flag), capsys)
    assert err == "fairseq-hash: error: --hash-experts 1: must be at least 2\n"


def test_an_error_raised_from_ours_prints_our_line(hook, capsys):
    def wrapped():
        try:
            bad_flag()
        except HashConfigError as e:
            raise RuntimeError("loading failed") from e

    err = report(hook, raised(wrapped), capsys)
    assert err == "fairseq-hash: error: --hash-experts 1: must be at least 2\n"


def test_an_unrelated_error_while_handling_ours_prints_its_traceback(hook, capsys):
    def bug():
        try:
            bad_flag()
        except HashConfigError:
            {}["missing"]

    err = report(hook, raised(bug), capsys)
    assert "Traceback" in err and "KeyError: 'missing'" in err
    assert not err.startswith("fairseq-hash: error:")


def test_fairseqs_trainer_replacing_our_load_error_prints_our_line(hook, capsys):
    # fairseq's Trainer.load_checkpoint does this, in a file fairseq/trainer.py
    source = (
        "def load_checkpoint(load):\n"
        "    try:\n"
        "        load()\n"
        "    except Exception:\n"
        "        raise Exception('Cannot load model parameters from checkpoint x.pt')\n"
    )
    scope = {}
    exec(compile(source, os.path.join("site-packages", "fairseq", "trainer.py"), "exec"), scope)
    err = report(hook, raised(lambda: scope["load_checkpoint"](bad_flag)), capsys)
    assert err == "fairseq-hash: error: --hash-experts 1: must be at least 2\n"


def test_the_same_replacement_elsewhere_keeps_its_traceback(hook, capsys):
    def load_checkpoint():
        try:
            bad_flag()
        except HashConfigError:
            raise Exception("Cannot load model parameters from checkpoint x.pt")

    err = report(hook, raised(load_checkpoint), capsys)
    assert "Traceback" in err and "Exception: Cannot load model parameters" in err


def test_importing_the_plugin_leaves_a_programs_excepthook_alone():
    code = ("import sys\n"
            "before = sys.excepthook\n"
            "import fairseq_hash\n"
            "from fairseq_hash.errors import HashConfigError\n"
            "assert sys.excepthook is before, sys.excepthook\n"
            "raise HashConfigError('--hash-experts 1: must be at least 2')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "fairseq_hash.errors.HashConfigError: --hash-experts 1" in proc.stderr


@pytest.mark.parametrize("argv0, main_module, expected", [
    ("/venv/bin/fairseq-train", "__main__", True),
    ("/venv/bin/fairseq-hash-demo", "__main__", True),
    ("-m", "fairseq_cli.eval_lm", True),
    ("-m", "fairseq_hash.cli.report", True),
    ("/venv/bin/pytest", "__main__", False),
    ("my_script.py", "__main__", False),
    ("", "__main__", False),
])
def test_commands_are_recognised_by_script_name_or_main_module(monkeypatch, argv0, main_module,
                                                               expected):
    import importlib.machinery
    import types

    main = types.ModuleType("__main__")
    if main_module != "__main__":
        main.__spec__ = importlib.machinery.ModuleSpec(main_module, None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert errors.running_as_command() is expected


@pytest.mark.parametrize("module, expected", [
    ("fairseq_hash.cli.torchrun_train", True), ("pytest", False)])
def test_python_m_is_recognised_while_it_imports_the_package(monkeypatch, module, expected):
    import types

    # runpy imports a -m module's packages first: no spec on __main__ yet, argv[0] "-m"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(sys, "argv", ["-m", "data-bin"])
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-m", module, "data-bin"])
    assert errors.running_as_command() is expected


def test_python_m_fairseq_cli_train_prints_our_error_in_one_line(data_bin, tmp_path):
    proc = run([sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir", user_dir(),
                *TINY_MODEL, *TINY_TRAIN, "--hash-experts", "1", "--max-update", "1",
                "--save-dir", str(tmp_path / "ckpt")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        "fairseq-hash: error: --hash-experts 1: must be at least 2"
    assert "Traceback" not in proc.stderr
