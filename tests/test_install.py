"""Installing the plugin into an environment that already has torch and fairseq."""
import os
import shutil
import site
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_env():
    """The environment without PYTHONPATH, so that imports come from what is installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_pip_install_no_deps_into_a_fairseq_environment_installs_nothing_else_and_works(tmp_path):
    # a copy of the project, so that the test's own checkout stays as it is
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "fairseq_hash"), src / "fairseq_hash",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), src / "setup.py")
    # a fresh venv that sees this environment's packages (torch, fairseq, pip,
    # setuptools) through a plain path: the .pth files there, among them this
    # environment's own editable fairseq_hash, are not run
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    packages = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(packages, "base.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    python = str(venv / "bin" / "python")
    before = os.listdir(packages)

    proc = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "-q", "-e", str(src)],
                          capture_output=True, text=True, env=plain_env())
    assert proc.returncode == 0, proc.stderr
    added = set(os.listdir(packages)) - set(before)
    assert [n for n in added if n.endswith(".dist-info")] == ["fairseq_hash-0.1.0.dist-info"]

    printed = subprocess.run([str(venv / "bin" / "fairseq-hash-user-dir")], capture_output=True,
                             text=True, env=plain_env(), check=True).stdout.strip()
    assert printed == str(src / "fairseq_hash")
    registered = subprocess.run(
        [python, "-c", "import fairseq_hash; from fairseq.models import ARCH_MODEL_REGISTRY; "
         "print('hash_transformer_lm' in ARCH_MODEL_REGISTRY)"],
        capture_output=True, text=True, env=plain_env())
    assert registered.stdout.strip() == "True", registered.stderr


def test_importing_the_plugin_without_fairseq_says_what_to_install_in_one_line(tmp_path):
    # a fairseq that fails on import, as fairseq 0.12.2 does on Python 3.11
    broken = tmp_path / "fairseq"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ValueError('mutable default for field common')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, "-c", "import fairseq_hash"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fairseq-hash needs fairseq, which does not import here")
    assert "mutable default" in last and "pip install 'fairseq-hash[fairseq]'" in last
