"""fairseq's --bf16 without a TPU (fairseq_hash/bf16.py): trains, resumes and evaluates on CPU,
on one process and on 2 gloo ranks with experts spread over them."""
import math
import os

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from fairseq_hash.bf16 import tpu_implied_by_bf16
from test_expert_parallel import train_on_two_ranks

UNTIED = "--bf16 without --tpu: bf16 on this run's device"


class Cfg:
    def __init__(self, tpu, bf16):
        self.common = type("Common", (), {"tpu": tpu, "bf16": bf16})()


@pytest.mark.parametrize("argv, implied", [
    (["data-bin", "--bf16"], True),
    (["data-bin", "--memory-efficient-bf16"], True),
    (["data-bin", "--bf16", "--tpu"], False),  # a TPU asked for keeps fairseq's behaviour
    (["data-bin"], False),  # hydra's config: no coupling happened
])
def test_only_the_tpu_that_bf16_implied_is_undone(argv, implied):
    assert tpu_implied_by_bf16(Cfg(tpu=True, bf16=True), argv) is implied


def train(data_bin, save, updates):
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, "--bf16", "--log-interval", "1", "--max-update", str(updates),
                "--save-dir", save])
    return proc.stdout + proc.stderr


def test_bf16_on_cpu_trains_resumes_and_evaluates(data_bin, tmp_path):
    save = str(tmp_path / "bf16")
    first = train(data_bin, save, 6)
    assert UNTIED in first
    loss = [r["loss"] for r in json_logs(first, "train_inner")]
    assert len(loss) == 6 and all(math.isfinite(x) for x in loss) and loss[-1] < loss[0]
    resumed = train(data_bin, save, 8)
    assert "loaded checkpoint" in resumed.lower()
    assert [int(r["num_updates"]) for r in json_logs(resumed, "train_inner")] == [7, 8]
    proc = run([tool("fairseq-eval-lm"), data_bin, "--path", os.path.join(save, "checkpoint_last.pt"),
                "--user-dir", user_dir(), "--cpu", "--bf16", "--gen-subset", "valid",
                "--max-tokens", "512", "--tokens-per-sample", "32"])
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "Loss (base 2)" in l)
    assert math.isfinite(float(line.split("Loss (base 2):")[1].split(",")[0]))


def test_bf16_on_two_ranks_with_experts_spread_trains(data_bin, tmp_path):
    proc = train_on_two_ranks(data_bin, str(tmp_path / "two"), "--bf16", "--max-update", "3")
    out = proc.stdout + proc.stderr
    assert UNTIED in out and "2 consecutive rank(s)" in out
    loss = [r["loss"] for r in json_logs(out, "train_inner")]
    assert len(loss) == 3 and all(math.isfinite(x) for x in loss)
