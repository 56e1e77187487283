"""A checkpoint resumed on several ranks is the model it holds, for every router.

One epoch on one process, then a second epoch resumed from that file on one
process (``--update-freq 2``) and on two gloo ranks (one batch each): the same
global batches, so the same losses, update by update. Shared experts also
change world size: trained on two ranks, resumed on four.
"""
import os
import shutil

import pytest
import torch
from fairseq.data import Dictionary

from fairseq_hash.hashing import build_hash_function
from fairseq_hash.routers import HashRouter
from test_expert_parallel import (assert_same_weights, losses, train_on_one_rank, train_on_ranks,
                                  train_on_two_ranks)
from test_topk_train import TOP2

ROUTERS = {
    "hash": [],
    "hash-top2-score": ["--hash-topk", "2", "--hash-score", "softmax"],
    "switch": ["--router", "switch", "--criterion", "moe_cross_entropy"],
}
# a random top-k table is an argsort's first k columns (see the test below)
TOP2_RANDOM = ["--hash-topk", "2", "--hash-type", "random"]
SECOND_EPOCH = ["--max-epoch", "2", "--max-update", "10"]  # epoch 1 is 7 updates


def first_epoch(data_bin, tmp_path, flags):
    first = str(tmp_path / "epoch1")
    train_on_one_rank(data_bin, first, "--max-epoch", "1", *flags)
    return first


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("router", ROUTERS)
def test_a_resumed_run_on_two_ranks_continues_as_on_one_process(data_bin, tmp_path, router):
    flags = ROUTERS[router]
    first = first_epoch(data_bin, tmp_path, flags)
    one = losses(train_on_one_rank(data_bin, copy(first, str(tmp_path / "one")), *SECOND_EPOCH,
                                   *flags))
    two = losses(train_on_two_ranks(data_bin, copy(first, str(tmp_path / "two")), *SECOND_EPOCH,
                                    *flags))
    assert len(one) == 3 and two == one


def test_top2_hash_from_a_table_saved_as_a_slice_resumes_on_two_ranks_as_on_one(data_bin,
                                                                              tmp_path):
    """Checkpoints written before routers stored their tables contiguous.

    fairseq sends rank 0's checkpoint to the others tensor by tensor in memory
    order; the second rank then routed by a scrambled table (first loss 6.108
    against 6.079 for K=8).
    """
    flags = TOP2_RANDOM
    first = first_epoch(data_bin, tmp_path, flags)
    path = os.path.join(first, "checkpoint_last.pt")
    state = torch.load(path)
    for key, table in state["model"].items():
        if key.endswith("router.table"):
            wide = torch.cat([table, table], dim=1)
            state["model"][key] = wide[:, :table.size(1)]  # the same values, not contiguous
            assert not state["model"][key].is_contiguous()
    torch.save(state, path)
    assert not torch.load(path)["model"]["decoder.layers.0.fc1.router.table"].is_contiguous()
    one = losses(train_on_one_rank(data_bin, copy(first, str(tmp_path / "one")), *SECOND_EPOCH,
                                   *flags))
    two = losses(train_on_two_ranks(data_bin, copy(first, str(tmp_path / "two")), *SECOND_EPOCH,
                                    *flags))
    assert len(one) == 3 and two == one


def test_top2_resumed_with_experts_spread_continues_as_with_every_expert_on_every_rank(
        data_bin, tmp_path):
    """The top-2 gate draws noise per rank, so no one-process run replays two
    ranks; with every expert on each rank (P=1) the resumed run is the
    reference for two experts a rank (P=2)."""
    flags = ["--router", "top2", "--criterion", "moe_cross_entropy"]
    first = first_epoch(data_bin, tmp_path, flags)
    whole = losses(train_on_two_ranks(data_bin, copy(first, str(tmp_path / "whole")),
                                      *SECOND_EPOCH, *flags, "--moe-expert-parallel-size", "1"))
    spread = losses(train_on_two_ranks(data_bin, copy(first, str(tmp_path / "spread")),
                                       *SECOND_EPOCH, *flags))
    assert len(whole) == 3 and spread == whole


def test_shared_experts_trained_on_two_ranks_and_resumed_on_four_continue_as_one_process(
        data_bin, tmp_path):
    """Top-2 with scores and a shared expert: epoch 1 on two ranks, epoch 2 on
    four (one routed expert a rank), against one process with ``--update-freq``
    2, then 4. The shared expert and the gate are all-reduced with fairseq's
    other shared weights; unsynchronised on four ranks, each rank steps with a
    quarter of the batch and loss and weights part from the reference."""
    one, ranks = str(tmp_path / "one"), str(tmp_path / "ranks")
    one_first = losses(train_on_one_rank(data_bin, one, *TOP2, "--max-epoch", "1"))
    two_first = losses(train_on_two_ranks(data_bin, ranks, *TOP2, "--max-epoch", "1"))
    assert len(one_first) == 7 and two_first == one_first
    one_second = losses(train_on_one_rank(data_bin, one, *TOP2, "--max-epoch", "2",
                                          "--update-freq", "4"))
    four_second = losses(train_on_ranks(4, data_bin, ranks, *TOP2, "--max-epoch", "2"))
    assert len(one_second) == 4 and four_second == one_second
    shared = "decoder.layers.0.fc1.shared.fc1.weight"
    assert shared in torch.load(os.path.join(ranks, "checkpoint_last.pt"))["model"]
    assert_same_weights(os.path.join(one, "checkpoint_last.pt"),
                        os.path.join(ranks, "checkpoint_last.pt"), rel=1e-4)


def test_hash_tables_are_stored_contiguous():
    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    fn = build_hash_function("random", 8)
    table = fn.build_topk_table(dictionary, 8, 2, seed=1)
    router = HashRouter(fn, table, 8, 0, topk=2)
    assert torch.equal(router.table, table) and router.table.is_contiguous()
