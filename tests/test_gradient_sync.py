"""Expert gradients: reduced once per update, and a non-finite one skips the step everywhere."""
import os
import subprocess
import sys

import pytest
import torch

from test_expert_parallel import env, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def run_sync_workers(case, tmp_path):
    port, out = free_port(), str(tmp_path / case)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ep_sync_worker.py"),
                               str(rank), "2", str(port), case, out],
                              env=env(), stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def once_and_every(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    return run_sync_workers("once", tmp), run_sync_workers("every", tmp)


def test_replica_gradients_are_reduced_once_per_update_and_equal_reducing_every_backward(
        once_and_every):
    once, every = once_and_every
    # 4 expert tensors, then the overflow check's one number, per reduction
    per_update = sorted([(4, 16, 8), (4, 16), (4, 8, 16), (4, 8)]) + [()]

    def updates(reduces):  # in autograd's order, the check's number last
        return [sorted(reduces[i:i + 4]) + reduces[i + 4:i + 5] for i in range(0, len(reduces), 5)]

    assert updates(once[0]["reduces"]) == [per_update]
    assert updates(every[0]["reduces"]) == [per_update, per_update]
    for a, b in zip(once, every):
        for name, grad in a["grads"].items():
            torch.testing.assert_close(grad, b["grads"][name])
    for name, grad in once[0]["grads"].items():
        assert torch.equal(grad, once[1]["grads"][name]), name  # replicas agree exactly


def test_a_finite_update_leaves_the_anchor_gradient_alone(once_and_every):
    once, _ = once_and_every
    for rank in once:
        assert torch.isfinite(rank["anchor"]).all()


def test_a_non_finite_expert_gradient_on_one_rank_reaches_every_ranks_shared_norm(tmp_path):
    ranks = run_sync_workers("overflow", tmp_path)  # experts spread: rank 1's are inf
    assert not torch.isfinite(ranks[1]["grads"]["fc1_weight"]).all()
    assert torch.isfinite(ranks[0]["grads"]["fc1_weight"]).all()
    for rank in ranks:
        # fairseq's norm sees the shared gradients: NaN on both ranks, so both skip
        assert torch.isnan(rank["anchor"].view(-1)[0])
        assert torch.isfinite(rank["anchor"].view(-1)[1:]).all()
        assert torch.isfinite(rank["bias"]).all()
