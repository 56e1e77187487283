"""Sharded checkpoints of expert-parallel runs (2 and 4 gloo ranks): each rank
writes its own experts, any world size reads them, one process reads the set."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

from fairseq_hash import expert_shards  # (imports fairseq before any test runs)

from conftest import TINY_MODEL, TINY_TRAIN, run, tool, user_dir
from test_bad_input import error_line
from test_expert_parallel import (EXACT, assert_same_weights, env, eval_lm, free_port, losses,
                                  train_on_two_ranks, whole_model)

EXPERT_KEY = "decoder.layers.0.fc1.experts.fc1_weight"


def shard_files(save_dir):
    return sorted(glob.glob(os.path.join(save_dir, "experts-*.pt")))


def train_on_ranks(world, data_bin, save_dir, *extra, check=True):
    """fairseq-train on ``world`` gloo ranks; rank 0's output."""
    args = [tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN,
            *EXACT, "--save-dir", save_dir, "--distributed-world-size", str(world),
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-no-spawn", "--distributed-init-method",
            f"tcp://127.0.0.1:{free_port()}", *extra]
    others = [subprocess.Popen(args + ["--distributed-rank", str(r)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env())
              for r in range(1, world)]
    first = run(args + ["--distributed-rank", "0"], check=False)
    errors = [p.communicate(timeout=900)[1] for p in others]
    if check:
        assert first.returncode == 0 and not any(p.returncode for p in others), \
            first.stderr[-4000:] + "".join(e[-1500:] for e in errors)
    return first


@pytest.fixture(scope="module")
def sharded(data_bin, tmp_path_factory):
    """One epoch on two ranks, two experts a rank: a sharded set."""
    save = str(tmp_path_factory.mktemp("sharded"))
    train_on_two_ranks(data_bin, save, "--max-epoch", "1")
    return save


def copy_of(save, tmp_path, name):
    copy = str(tmp_path / name)
    shutil.copytree(save, copy)
    return copy


def test_each_rank_writes_its_own_experts_and_rank_0_the_rest_and_the_index(sharded):
    main = torch.load(os.path.join(sharded, "checkpoint_last.pt"))
    assert not any(".experts." in key for key in main["model"])  # only shared weights
    index = main["fairseq_hash_expert_shards"]
    files = shard_files(sharded)
    assert [s["file"] for s in index["shards"]] == [os.path.basename(f) for f in files]
    assert len(files) == 2
    optimizer_state = main["last_optimizer_state"]["state"]
    assert not set(index["optimizer"].values()) & set(optimizer_state)  # moments in the shards
    whole = whole_model(os.path.join(sharded, "checkpoint_last.pt"))
    for rank, file in enumerate(files):
        shard = torch.load(file)
        assert shard["shard"] == rank and set(shard["model"]) == set(index["model"])
        for key, rows in shard["model"].items():
            # this rank's 2 of 4 experts, and Adam's moments of those rows only
            assert shard["rows"][key] == [2 * rank, 2, 4]
            assert torch.equal(rows, whole[key][2 * rank:2 * rank + 2])
            moments = shard["optimizer"][key]
            assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == rows.shape
            assert torch.count_nonzero(moments["exp_avg_sq"]) > 0


def test_consolidate_writes_the_one_file_checkpoint_with_the_same_perplexity(
        data_bin, sharded, tmp_path):
    out = str(tmp_path / "whole.pt")
    run([tool("fairseq-hash-consolidate"), os.path.join(sharded, "checkpoint_last.pt"),
         "--output", out])
    state = torch.load(out)
    assert "fairseq_hash_expert_shards" not in state
    assert state["model"][EXPERT_KEY].size(0) == 4
    moments = [s for s in state["last_optimizer_state"]["state"].values()
               if s["exp_avg"].size(0) == 4 and s["exp_avg"].dim() == 3]
    assert len(moments) == 4  # fc1 and fc2 weights of both hash layers
    # one process reads the set with no step in between; both give one perplexity
    assert eval_lm(data_bin, out) == eval_lm(data_bin, os.path.join(sharded, "checkpoint_last.pt"))
    from fairseq.models.transformer_lm import TransformerLanguageModel

    hub = TransformerLanguageModel.from_pretrained(sharded, "checkpoint_last.pt", data_bin)
    for key, value in hub.models[0].state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    again = run([tool("fairseq-hash-consolidate"), out, "--output", str(tmp_path / "x.pt")],
                check=False)
    assert again.returncode == 2 and again.stderr == (
        f"fairseq-hash-consolidate: error: {out}: already one file (it names no expert shards)\n")
    assert not os.path.exists(tmp_path / "x.pt")


def test_a_save_that_stops_before_its_index_leaves_the_previous_checkpoint_whole(
        data_bin, sharded, tmp_path):
    save = copy_of(sharded, tmp_path, "crashed")
    before = eval_lm(data_bin, os.path.join(save, "checkpoint_last.pt"))
    old = shard_files(save)
    # fairseq writes its file as NAME.tmp, then renames it: a folder in the way
    # makes the write fail after every rank has written its shard
    for name in ("checkpoint_best.pt.tmp", "checkpoint_last.pt.tmp"):
        os.mkdir(os.path.join(save, name))
    proc = train_on_two_ranks(data_bin, save, "--max-epoch", "2", check=False)
    assert proc.returncode != 0
    assert len(shard_files(save)) == 4 and set(old) <= set(shard_files(save))
    for name in ("checkpoint_best.pt.tmp", "checkpoint_last.pt.tmp"):
        os.rmdir(os.path.join(save, name))
    assert eval_lm(data_bin, os.path.join(save, "checkpoint_last.pt")) == before
    # the next complete save removes every shard no checkpoint names
    train_on_two_ranks(data_bin, save, "--max-epoch", "2")
    index = torch.load(os.path.join(save, "checkpoint_last.pt"))["fairseq_hash_expert_shards"]
    assert [os.path.basename(f) for f in shard_files(save)] == [
        s["file"] for s in index["shards"]]
    assert not set(old) & set(shard_files(save))


@pytest.mark.parametrize("damage", ["missing", "swapped", "truncated"])
def test_a_set_with_a_missing_or_mismatched_shard_is_refused_naming_the_file(
        data_bin, sharded, tmp_path, damage):
    save = copy_of(sharded, tmp_path, damage)
    first, second = shard_files(save)
    if damage == "missing":
        os.remove(second)
    elif damage == "swapped":
        shutil.copy(first, second)
    else:
        with open(second, "r+b") as f:
            f.truncate(1000)
    proc = run([tool("fairseq-eval-lm"), data_bin, "--user-dir", user_dir(), "--path",
                os.path.join(save, "checkpoint_last.pt"), "--cpu", "--gen-subset", "valid",
                "--num-workers", "0"], check=False)
    line = error_line(proc)
    assert second in line, line
    assert {"missing": "is missing", "swapped": "where the index expects",
            "truncated": "bytes where the index expects"}[damage] in line


def test_four_ranks_resume_a_two_rank_set_as_one_process_does_and_write_four_shards(
        data_bin, sharded, tmp_path):
    one = copy_of(sharded, tmp_path, "one")
    four = copy_of(sharded, tmp_path, "four")
    keep_epochs = [a for a in TINY_TRAIN if a != "--no-epoch-checkpoints"]
    reference = losses(run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(),
                            *TINY_MODEL, *keep_epochs, *EXACT, "--save-dir", one,
                            "--update-freq", "4", "--max-epoch", "2"]))
    resumed = losses(train_on_ranks(4, data_bin, four, "--max-epoch", "2"))
    assert resumed and resumed == reference[:len(resumed)]
    files = shard_files(four)
    assert len(files) == 4  # one expert a rank, P = W = 4
    assert [torch.load(f)["rows"][EXPERT_KEY] for f in files] == [[r, 1, 4] for r in range(4)]
    assert_same_weights(os.path.join(one, "checkpoint_last.pt"),
                        os.path.join(four, "checkpoint_last.pt"), rel=1e-4)


def test_replicas_write_no_shard_and_resume_on_another_layout(data_bin, sharded, tmp_path):
    """4 ranks with P=2: two shards (ranks 0 and 1), ranks 2 and 3 hold replicas."""
    four = copy_of(sharded, tmp_path, "replicas")
    train_on_ranks(4, data_bin, four, "--max-epoch", "2", "--moe-expert-parallel-size", "2")
    files = shard_files(four)
    assert [torch.load(f)["rows"][EXPERT_KEY] for f in files] == [[0, 2, 4], [2, 2, 4]]
    two = copy_of(four, tmp_path, "two")
    reference = copy_of(four, tmp_path, "reference")
    whole = os.path.join(reference, "checkpoint_last.pt")
    run([tool("fairseq-hash-consolidate"), whole, "--output", whole + ".one"])
    os.replace(whole + ".one", whole)  # the same state as one file
    a = losses(train_on_two_ranks(data_bin, two, "--max-epoch", "3"))
    b = losses(train_on_two_ranks(data_bin, reference, "--max-epoch", "3"))
    assert a and a == b


def test_fp16_optimizer_state_of_every_expert_is_saved_and_resumed(data_bin, tmp_path):
    """fairseq's FP16Optimizer keeps Adam's moments under fp32 copies of the
    parameters: each shard must still hold its experts' moments, and a resume
    from the shards must continue as a resume from the one-file checkpoint."""
    fp16 = ["--fp16", "--fp16-no-flatten-grads"]
    save = str(tmp_path / "fp16")
    train_on_two_ranks(data_bin, save, "--max-epoch", "1", *fp16)
    for rank, file in enumerate(shard_files(save)):
        shard = torch.load(file)
        assert set(shard["optimizer"]) == set(shard["model"])
        for key, moments in shard["optimizer"].items():
            assert moments["exp_avg"].dtype == torch.float32
            assert moments["exp_avg"].shape == shard["model"][key].shape
            assert torch.count_nonzero(moments["exp_avg_sq"]) > 0
    reference = copy_of(save, tmp_path, "one-file")
    whole = os.path.join(reference, "checkpoint_last.pt")
    run([tool("fairseq-hash-consolidate"), whole, "--output", whole + ".one"])
    os.replace(whole + ".one", whole)
    a = losses(train_on_two_ranks(data_bin, save, "--max-epoch", "2", *fp16))
    b = losses(train_on_two_ranks(data_bin, reference, "--max-epoch", "2", *fp16))
    assert a and a == b


def test_rows_across_shards_are_read_as_one_tensor_and_one_state(tmp_path):
    """Rows [1, 3) of a set of two shards of 2 rows: one from each file."""
    whole = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    written = []
    for shard in range(2):
        rows = whole[2 * shard:2 * shard + 2].clone()
        name = expert_shards.shard_name("e1-u1-ab", shard, 2)
        torch.save(expert_shards.shard_contents(
            "e1-u1-ab", shard, 2, model={"w": rows}, rows={"w": [2 * shard, 2, 4]},
            optimizer={"w": {"exp_avg": -rows, "step": 7}}), tmp_path / name)
        written.append({"shard": shard, "file": name, "bytes": os.path.getsize(tmp_path / name),
                        "rows": {"w": [2 * shard, 2, 4]}})
    state = {"model": {}, "last_optimizer_state": {"state": {}},
             expert_shards.INDEX: expert_shards.build_index("e1-u1-ab", written, {"w": 0})}
    state = expert_shards.resolve_shards(state, str(tmp_path / "checkpoint_last.pt"))
    ref = state["model"]["w"]
    assert torch.equal(expert_shards.read_rows(ref, 1, 2), whole[1:3])
    moments = expert_shards.read_rows(expert_shards.optimizer_reference(ref), 1, 2)
    assert torch.equal(moments["exp_avg"], -whole[1:3]) and moments["step"] == 7
    one_file = expert_shards.consolidated(state)
    assert torch.equal(one_file["model"]["w"], whole)
    assert torch.equal(one_file["last_optimizer_state"]["state"][0]["exp_avg"], -whole)
