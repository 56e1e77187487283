"""Four ranks: torchrun on two loopback "nodes" of two processes, and P = 2 and P = 4,
each training the model one process trains with ``--update-freq 4``.

K = 4 experts a layer. Under torchrun (LOCAL_WORLD_SIZE 2) the default
expert-parallel size is the ranks of a node: P = 2, two experts a rank, the two
nodes replicas of each other. By hand, ``--moe-expert-parallel-size 4``: one
expert a rank. The torchrun run's checkpoint then resumes on two ranks.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, run, user_dir
from test_expert_parallel import (EXACT, assert_same_weights, env, free_port, losses,
                                  train_on_one_rank, train_on_ranks)

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def one_process(data_bin, tmp_path_factory):
    """Epoch 1 on one process with four batches an update, then epoch 2 resumed."""
    save = str(tmp_path_factory.mktemp("one_process"))
    first = losses(train_on_one_rank(data_bin, save, "--max-epoch", "1", "--update-freq", "4"))
    epoch1 = shutil.copytree(save, save + "-epoch1")
    second = losses(train_on_one_rank(data_bin, save, "--max-epoch", "2", "--update-freq", "4"))
    return epoch1, first, save, second


def torchrun_two_nodes(data_bin, save_dir, *extra):
    """Two torchrun agents on 127.0.0.1, two processes each: node 0's output."""
    launch = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())]
    train = ["-m", "fairseq_hash.cli.torchrun_train", data_bin, "--user-dir", user_dir(),
             *TINY_MODEL, *TINY_TRAIN, *EXACT, "--ddp-backend", "legacy_ddp",
             "--save-dir", save_dir, *extra]
    other = subprocess.Popen(launch + ["--node-rank", "1"] + train, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env())
    first = run(launch + ["--node-rank", "0"] + train, check=False)
    _, other_err = other.communicate(timeout=600)
    assert first.returncode == 0 and other.returncode == 0, \
        first.stdout[-3000:] + first.stderr[-3000:] + other_err[-2000:]
    return first


@pytest.fixture(scope="module")
def torchrun_epoch1(data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("torchrun"))
    return save, torchrun_two_nodes(data_bin, save, "--max-epoch", "1")


def test_torchrun_on_two_nodes_of_two_trains_the_one_process_model(one_process,
                                                                    torchrun_epoch1):
    epoch1, first, _, _ = one_process
    save, proc = torchrun_epoch1
    out = proc.stdout + proc.stderr
    # four ranks in one world, not four worlds of one: one file, four batches an update
    assert "2 expert group(s) of 2 consecutive rank(s) (--moe-expert-parallel-size 2)" in out
    assert len(first) == 4 and losses(proc) == first
    files = sorted(f for f in os.listdir(save) if f.endswith(".pt"))
    assert [f for f in files if f.startswith("checkpoint")] == [
        "checkpoint_best.pt", "checkpoint_last.pt"]
    # P = 2: ranks 0 and 1 write the experts' shards, their replicas nothing
    assert len([f for f in files if f.startswith("experts-")]) == 2
    assert_same_weights(os.path.join(epoch1, "checkpoint_last.pt"),
                        os.path.join(save, "checkpoint_last.pt"))


def test_four_ranks_with_one_expert_each_train_the_one_process_model(data_bin, one_process,
                                                                      tmp_path):
    epoch1, first, _, _ = one_process
    save = str(tmp_path / "p4")
    proc = train_on_ranks(4, data_bin, save, "--max-epoch", "1", "--moe-expert-parallel-size",
                          "4")
    assert losses(proc) == first
    assert_same_weights(os.path.join(epoch1, "checkpoint_last.pt"),
                        os.path.join(save, "checkpoint_last.pt"))


def test_resuming_the_four_rank_checkpoint_on_two_ranks_continues_as_one_process_does(
        data_bin, one_process, torchrun_epoch1, tmp_path):
    _, _, resumed, second = one_process
    save = shutil.copytree(torchrun_epoch1[0], str(tmp_path / "two"))
    proc = train_on_ranks(2, data_bin, save, "--max-epoch", "2", "--update-freq", "2")
    assert len(second) == 4 and losses(proc) == second
    assert_same_weights(os.path.join(resumed, "checkpoint_last.pt"),
                        os.path.join(save, "checkpoint_last.pt"), rel=1e-4)
