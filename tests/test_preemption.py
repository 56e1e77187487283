"""Save on the scheduler's signal (fairseq_hash/preemption.py): SIGTERM to any rank ends the
run after one update on every rank, with checkpoint_last written; resuming repeats the
losses of the run that was never stopped, update for update."""
import os
import signal
import subprocess
import time

import torch

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, tool, user_dir
from test_expert_parallel import BY_HAND, env, free_port

# small batches: many updates an epoch, so the stop falls inside the first one
FLAGS = [*TINY_MODEL, *TINY_TRAIN, "--max-tokens", "128", "--log-interval", "1"]


def start(data_bin, save, world, *extra):
    """``world`` fairseq-train processes (by hand on gloo when 2); their log files."""
    args = [tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *FLAGS, "--save-dir", save,
            *extra]
    if world > 1:
        args += [*BY_HAND, "--distributed-world-size", str(world), "--distributed-init-method",
                 f"tcp://127.0.0.1:{free_port()}"]
    procs = []
    for rank in range(world):
        log = open(f"{save}.rank{rank}.log", "w")
        rank_args = ["--distributed-rank", str(rank)] if world > 1 else []
        procs.append((subprocess.Popen(args + rank_args, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(env(), PYTHONUNBUFFERED="1")), log.name))
    return procs


def text(path):
    with open(path) as f:
        return f.read()


def wait_for_updates(log, count, timeout=300):
    deadline = time.time() + timeout
    while len(json_logs(text(log), "train_inner")) < count:
        assert time.time() < deadline, text(log)[-3000:]
        time.sleep(0.2)


def finish(procs, timeout=300):
    return [p.wait(timeout=timeout) for p, _ in procs]


def train_losses(procs):
    return [(int(r["num_updates"]), r["loss"]) for r in json_logs(text(procs[0][1]), "train_inner")]


def stopped_and_resumed(data_bin, tmp_path, world):
    save = str(tmp_path / "stopped")
    procs = start(data_bin, save, world, "--max-update", "3000")
    wait_for_updates(procs[0][1], 2)
    procs[-1][0].send_signal(signal.SIGTERM)  # one rank only: the last
    sent = time.time()
    codes = finish(procs, timeout=120)
    assert codes == [128 + signal.SIGTERM] * world, text(procs[0][1])[-3000:]
    assert time.time() - sent < 120
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), map_location="cpu",
                       weights_only=False)
    stopped = state["optimizer_history"][-1]["num_updates"]
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == stopped  # mid-epoch
    resumed = start(data_bin, save, world, "--max-update", str(stopped + 3))
    assert finish(resumed) == [0] * world, text(resumed[0][1])[-3000:]
    whole = start(data_bin, str(tmp_path / "whole"), world, "--max-update", str(stopped + 3))
    assert finish(whole) == [0] * world
    return stopped, train_losses(resumed), train_losses(whole)


def test_sigterm_saves_and_the_resumed_run_repeats_the_uninterrupted_losses(data_bin, tmp_path):
    stopped, resumed, whole = stopped_and_resumed(data_bin, tmp_path, 1)
    assert [u for u, _ in resumed] == [stopped + 1, stopped + 2, stopped + 3]
    assert resumed == whole[stopped:]


def test_sigterm_to_one_of_two_ranks_stops_both_after_the_same_update(data_bin, tmp_path):
    stopped, resumed, whole = stopped_and_resumed(data_bin, tmp_path, 2)
    assert [u for u, _ in resumed] == [stopped + 1, stopped + 2, stopped + 3]
    assert resumed == whole[stopped:]


def test_no_save_on_signal_leaves_sigterm_to_python(data_bin, tmp_path):
    save = str(tmp_path / "plain")
    procs = start(data_bin, save, 1, "--max-update", "3000", "--no-save-on-signal")
    wait_for_updates(procs[0][1], 2)
    procs[0][0].send_signal(signal.SIGTERM)
    assert finish(procs) == [-signal.SIGTERM]
    assert not os.path.exists(os.path.join(save, "checkpoint_last.pt"))
