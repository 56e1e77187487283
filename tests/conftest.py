"""Shared helpers: a tiny corpus, fairseq's command-line tools in a subprocess; the test tiers."""
import json
import multiprocessing
import os
import random
import subprocess
import sys
import types

import pytest

BIN = os.path.dirname(sys.executable)

# a model small enough to train a few dozen updates in seconds on 2 cores
TINY_MODEL = [
    "--task", "language_modeling", "--arch", "hash_transformer_lm",
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2", "--hash-experts", "4", "--hash-layer", "0,-1",
    "--tokens-per-sample", "32", "--max-tokens", "512",
]
TINY_TRAIN = [
    "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "10", "--cpu", "--num-workers", "0", "--seed", "3",
    "--log-format", "json", "--log-interval", "5", "--no-epoch-checkpoints",
    "--dropout", "0.0",
]


def tool(name):
    return os.path.join(BIN, name)


_USER_DIR = []  # asked once a session: each start of the tool costs seconds


def user_dir():
    if not _USER_DIR:
        out = subprocess.run([tool("fairseq-hash-user-dir")], capture_output=True, text=True,
                             check=True)
        _USER_DIR.append(out.stdout.strip())
    return _USER_DIR[0]


def run(args, cwd=None, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def json_logs(text, tag):
    """fairseq's --log-format json lines of one kind ('train_inner', 'valid', ...)."""
    rows = []
    for line in text.splitlines():
        if f"| {tag} |" in line and "{" in line:
            row = json.loads(line[line.index("{"):])
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def write_corpus(folder, lines=600, vocab=120, seed=0):
    """Zipf-distributed words with local structure, split into train/valid/test."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]
    os.makedirs(folder, exist_ok=True)
    splits = {"train": lines, "valid": lines // 10, "test": lines // 10}
    for split, n in splits.items():
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            for _ in range(n):
                first = rng.choices(words, weights)[0]
                sent = [first]
                for _ in range(rng.randint(4, 14)):
                    # each word tends to be followed by its neighbour: learnable
                    prev = int(sent[-1][1:])
                    nxt = (prev + 1) % vocab if rng.random() < 0.6 else int(rng.choices(words, weights)[0][1:])
                    sent.append(words[nxt])
                f.write(" ".join(sent) + "\n")
    return folder


def preprocess(raw, dest):
    run([tool("fairseq-preprocess"), "--only-source", "--task", "language_modeling",
         "--trainpref", os.path.join(raw, "train.txt"), "--validpref", os.path.join(raw, "valid.txt"),
         "--testpref", os.path.join(raw, "test.txt"), "--destdir", dest, "--workers", "1"])
    return dest


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return preprocess(write_corpus(str(root / "raw")), str(root / "data-bin"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_bin):
    """A tiny hash-layer LM trained for 40 updates; returns (save_dir, stdout)."""
    save = str(tmp_path_factory.mktemp("ckpt"))
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, "--max-update", "40", "--save-dir", save])
    return save, proc.stdout + proc.stderr


# ---- test tiers: `-m unit` for the edit-test loop, `-m integration` for the rest ----
# A test is `integration` when it, a fixture it uses, or a helper of tests/ it calls
# starts another process (a subprocess, fairseq's command-line tools, several ranks);
# every other test is `unit`. A test file may mark a test itself to override this.

def _spawners():
    return {id(obj) for obj in (subprocess, multiprocessing, run, preprocess, tool)}


def _starts_processes(func, seen):
    """Whether func's code names a process starter, directly or through helpers of tests/."""
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    spawners = _spawners()
    names, stack = set(), [code]
    while stack:  # nested functions and lambdas too
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    for name in names:
        obj = func.__globals__.get(name)
        if obj is None:
            continue
        if id(obj) in spawners or getattr(obj, "__name__", "") in ("run_fairseq", "torch.multiprocessing"):
            return True
        if isinstance(obj, types.FunctionType) and _in_tests(obj) and _starts_processes(obj, seen):
            return True
    return False


def _in_tests(func):
    return os.path.dirname(os.path.abspath(func.__code__.co_filename)) == os.path.dirname(__file__)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        seen = set()
        fixtures = item._fixtureinfo.name2fixturedefs
        uses_processes = _starts_processes(getattr(item, "function", None), seen) or any(
            _starts_processes(defs[-1].func, seen) for name, defs in fixtures.items()
            if name != "_unit_tests_start_no_process" and _in_tests(defs[-1].func))
        slow = item.get_closest_marker("slow") is not None
        item.add_marker("integration" if uses_processes or slow else "unit")


def _starts_a_tool(args):
    """Python, or a command beside it (fairseq's tools, ours, torchrun), not a probe like lscpu."""
    program = str(args.split()[0] if isinstance(args, str) else list(args)[0])
    return os.path.dirname(program) == BIN or os.path.basename(program).startswith("python")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """Keeps the unit tier fast: a unit test that starts Python, fairseq's tools or ours,
    or a multiprocessing process fails and says why. Other commands (numpy's import
    runs lscpu) pass."""
    if request.node.get_closest_marker("unit") is None:
        return
    message = (f"{request.node.nodeid} starts a process: mark it @pytest.mark.integration "
               "(tests/conftest.py marks it unit)")

    class Popen(subprocess.Popen):
        def __new__(cls, args, *rest, **kwargs):
            if _starts_a_tool(args):
                raise AssertionError(message)
            return super().__new__(cls)

    def refuse(*args, **kwargs):
        raise AssertionError(message)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
