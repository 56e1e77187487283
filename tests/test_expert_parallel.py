"""Expert parallelism on 2 CPU processes (gloo): the model one process would train."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from test_bad_input import error_line

HERE = os.path.dirname(os.path.abspath(__file__))
# every update clipped: the norm must be the same on one and on two ranks
EXACT = ["--clip-norm", "0.5", "--log-interval", "1"]
# several CPU ranks launched by hand (DESIGN.md); --distributed-world-size W joins them
BY_HAND = ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
           "--distributed-no-spawn"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def train_on_ranks(world, data_bin, save_dir, *extra, check=True):
    """fairseq-train as ``world`` gloo ranks launched by hand; rank 0's output."""
    args = [tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN,
            *EXACT, "--save-dir", save_dir, *BY_HAND, "--distributed-world-size", str(world),
            "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}", *extra]
    others = [subprocess.Popen(args + ["--distributed-rank", str(rank)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env())
              for rank in range(1, world)]
    first = run(args + ["--distributed-rank", "0"], check=False)
    errors = [other.communicate(timeout=600)[1] for other in others]
    if check:
        assert first.returncode == 0 and all(o.returncode == 0 for o in others), (
            first.stderr[-4000:] + "".join(e[-2000:] for e in errors))
    return first


def train_on_two_ranks(data_bin, save_dir, *extra, check=True):
    return train_on_ranks(2, data_bin, save_dir, *extra, check=check)


def train_on_one_rank(data_bin, save_dir, *extra):
    keep_epochs = [a for a in TINY_TRAIN if a != "--no-epoch-checkpoints"]
    return run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *keep_epochs, *EXACT, "--save-dir", save_dir, "--update-freq", "2", *extra])


def losses(proc):
    return [(int(r["num_updates"]), r["loss"]) for r in json_logs(proc.stdout + proc.stderr,
                                                                  "train_inner")]


def whole_model(path):
    """The model of a one-file or sharded checkpoint, every expert row in place."""
    from fairseq_hash.distributed_checkpoints import expert_shards

    state = expert_shards.resolve_shards(torch.load(path, mmap=True), path)
    return expert_shards.consolidated(state)["model"]


def assert_same_weights(a, b, rel=1e-5):
    a, b = whole_model(a), whole_model(b)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape, key
        # the key bias's exact gradient is zero (softmax ignores a shift); Adam
        # turns its rounding noise, which differs with the summation order, into steps
        if value.is_floating_point() and not key.endswith("k_proj.bias"):
            scale = value.abs().max().clamp(min=1e-3)
            assert float((value - b[key]).abs().max() / scale) < rel, key


@pytest.fixture(scope="module")
def one_rank(data_bin, tmp_path_factory):
    """Three epochs on one process, two batches an update, resumed after each epoch.

    fairseq's own resumption on one process is the reference: even there, a
    run resumed at an epoch boundary does not replay an uninterrupted run's
    next update (measured: loss 4.989 resumed, 5.13 uninterrupted, at update 8).
    """
    save = str(tmp_path_factory.mktemp("one_rank"))
    updates = []
    for epoch in (1, 2, 3):
        updates += losses(train_on_one_rank(data_bin, save, "--max-epoch", str(epoch)))
    return save, updates


@pytest.fixture(scope="module")
def two_ranks(data_bin, tmp_path_factory):
    """The first epoch on two ranks, one batch each, two experts a rank."""
    save = str(tmp_path_factory.mktemp("two_ranks"))
    return save, losses(train_on_two_ranks(data_bin, save, "--max-epoch", "1"))


def test_two_ranks_train_the_model_one_rank_trains_with_update_freq_2(one_rank, two_ranks):
    (one, one_losses), (two, two_losses) = one_rank, two_ranks
    assert len(two_losses) >= 5
    assert two_losses == one_losses[:len(two_losses)]
    # the checkpoint holds all 4 experts of each layer, 2 from each rank
    assert whole_model(os.path.join(two, "checkpoint_last.pt"))[
        "decoder.layers.0.fc1.experts.fc1_weight"].size(0) == 4
    assert_same_weights(os.path.join(one, "checkpoint1.pt"),
                        os.path.join(two, "checkpoint_last.pt"))


def eval_lm_run(data_bin, path, *extra, check=True):
    return run([tool("fairseq-eval-lm"), data_bin, "--user-dir", user_dir(), "--path", path,
                "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512", "--gen-subset",
                "valid", "--num-workers", "0", *extra], check=check)


def perplexity(proc):
    line = [l for l in (proc.stdout + proc.stderr).splitlines() if "Perplexity" in l][-1]
    return float(line.rsplit("Perplexity:", 1)[1])


def eval_lm(data_bin, path):
    return perplexity(eval_lm_run(data_bin, path))


def test_the_two_rank_checkpoint_evaluates_in_one_process_as_the_one_rank_model(
        data_bin, one_rank, two_ranks):
    one = eval_lm(data_bin, os.path.join(one_rank[0], "checkpoint1.pt"))
    two = eval_lm(data_bin, os.path.join(two_ranks[0], "checkpoint_last.pt"))
    assert two == pytest.approx(one, rel=1e-5)


def test_a_checkpoint_of_an_explicit_layout_evaluates_in_one_process_unless_one_asks_for_it(
        data_bin, tmp_path):
    save = str(tmp_path / "explicit")
    train_on_two_ranks(data_bin, save, "--max-update", "2", "--moe-expert-parallel-size", "2")
    path = os.path.join(save, "checkpoint_last.pt")
    proc = eval_lm_run(data_bin, path)
    assert perplexity(proc) > 1
    assert "trained with --moe-expert-parallel-size 2; this run lays" in proc.stdout + proc.stderr
    # a layout the reading run names itself still has to fit it
    asked = eval_lm_run(data_bin, path, "--model-overrides", "{'moe_expert_parallel_size': 2}",
                        check=False)
    assert "--moe-expert-parallel-size 2 needs 2 or more ranks" in error_line(asked)


def test_resuming_2_to_1_then_1_to_2_continues_as_one_process_resumes(
        data_bin, one_rank, two_ranks, tmp_path):
    save = str(tmp_path / "resumed")
    shutil.copytree(two_ranks[0], save)  # epoch 1 on two ranks
    second = losses(train_on_one_rank(data_bin, save, "--max-epoch", "2"))
    third = losses(train_on_two_ranks(data_bin, save, "--max-epoch", "3"))
    uninterrupted = dict(one_rank[1])
    assert second and third
    assert [uninterrupted[update] for update, _ in second + third] == [
        loss for _, loss in second + third], (second, third, uninterrupted)
    assert third[-1][0] == max(uninterrupted)
    assert_same_weights(os.path.join(one_rank[0], "checkpoint_last.pt"),
                        os.path.join(save, "checkpoint_last.pt"), rel=1e-4)


def run_workers(case, tmp_path):
    port, out = free_port(), str(tmp_path / case.replace(":", "-"))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ep_worker.py"), str(rank), "2",
                               str(port), case, out], env=env(), stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{rank}.pt") for rank in range(2)]


def single_process_reference(router, ranks):
    """The same layer on one process, over both ranks' tokens."""
    from fairseq.data import Dictionary

    from ep_worker import layer_spec
    from fairseq_hash.hashing import RouteInputs
    from fairseq_hash.moe_factory import build_hash_moe

    dictionary = Dictionary()
    for i in range(30):
        dictionary.add_symbol(f"w{i}")
    torch.manual_seed(0)
    moe = build_hash_moe(layer_spec(router, "alltoall", 0), dictionary, 0, 8, 16)
    moe.load_state_dict({f"router.{k}": v for k, v in ranks[0]["router"].items()}, strict=False)
    moe.eval()
    x = torch.cat([r["x"] for r in ranks]).requires_grad_()
    tokens = torch.cat([r["tokens"] for r in ranks], dim=1)
    route = RouteInputs.from_tokens(tokens, dictionary.pad(), dictionary.eos())
    y = moe(x.unsqueeze(1), route).squeeze(1)
    (y * torch.arange(1.0, 9.0)).sum().backward()
    # what the workers applied: 0.1 x (the global batch's gradient, over W = 2)
    updated = {k: (p - 0.1 * p.grad / 2).detach() for k, p in moe.experts.named_parameters()}
    return y.detach(), x.grad, updated


@pytest.mark.parametrize("case, router", [("hash", "hash"), ("top2", "top2"),
                                          ("fairscale", "hash"), ("fairscale-top2", "top2"),
                                          ("exact", "hash"), ("exact-top2", "top2")])
def test_the_exchange_and_its_backward_equal_one_process(case, router, tmp_path):
    ranks = run_workers(case, tmp_path)
    y, x_grad, updated = single_process_reference(router, ranks)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_grad)
    assert [r["first"] for r in ranks] == [0, 2]  # two experts a rank
    for name, value in updated.items():
        torch.testing.assert_close(torch.cat([r["experts"][name] for r in ranks]), value)


def test_fairscale_dispatch_runs_in_bf16_as_the_index_exchange_does(tmp_path):
    # fairscale's MOELayer casts its dispatch mask to float32: bf16 inputs failed
    # ("expected scalar type Float but found BFloat16")
    fairscale = run_workers("fairscale:bfloat16", tmp_path)
    alltoall = run_workers("hash:bfloat16", tmp_path)
    for a, b in zip(fairscale, alltoall):
        assert a["y"].dtype == torch.bfloat16
        torch.testing.assert_close(a["y"], b["y"])
        torch.testing.assert_close(a["x_grad"], b["x_grad"])


def test_expert_replicas_stay_bit_identical_and_learn_from_both_ranks(tmp_path):
    ranks = run_workers("replicas", tmp_path)  # P = 1: all 4 experts on both ranks
    assert ranks[0]["first"] == ranks[1]["first"] == 0
    for name, value in ranks[0]["experts"].items():
        assert torch.equal(value, ranks[1]["experts"][name]), name


def test_replicas_on_two_ranks_train_the_one_rank_model(data_bin, one_rank, tmp_path):
    save = str(tmp_path / "replicas")
    two = losses(train_on_two_ranks(data_bin, save, "--max-epoch", "1",
                                    "--moe-expert-parallel-size", "1"))
    assert two == one_rank[1][:len(two)]
    assert_same_weights(os.path.join(one_rank[0], "checkpoint1.pt"),
                        os.path.join(save, "checkpoint_last.pt"))


def test_accumulating_micro_batches_sync_expert_gradients_once_an_update(data_bin, tmp_path):
    # 2 ranks of 2 micro-batches an update against 1 rank of 4: expert gradients
    # are divided by W on the last micro-batch only (fairseq's no_sync on the
    # others); dividing at every backward would halve the first one's share
    one = losses(train_on_one_rank(data_bin, str(tmp_path / "one"), "--max-update", "4",
                                   "--update-freq", "4"))
    proc = train_on_two_ranks(data_bin, str(tmp_path / "two"), "--max-update", "4",
                              "--update-freq", "2")
    assert "reduced once per update, on the last micro-batch" in proc.stdout + proc.stderr
    assert len(one) == 4 and losses(proc) == one
    assert_same_weights(str(tmp_path / "one" / "checkpoint_last.pt"),
                        str(tmp_path / "two" / "checkpoint_last.pt"))


@pytest.mark.parametrize("flags, expected", [
    (["--moe-expert-parallel-size", "3"], "--moe-expert-parallel-size 3 must divide both"),
    (["--hash-experts", "3"], "--hash-experts 3 and a world of 2 ranks"),
    (["--ddp-backend", "slowmo"], "--ddp-backend slowmo cannot keep hash-layer experts"),
    (["--decoder-layerdrop", "0.5"], "--decoder-layerdrop 0.5: LayerDrop skips layers"),
    (["--store-ema"], "--store-ema copies the model"),
    (["--zero-sharding", "os"], "--zero-sharding os: fairscale's OSS takes every rank's"),
    (["--use-bmuf"], "--use-bmuf averages every parameter over all ranks"),
])
def test_bad_layouts_and_backends_give_one_line_and_write_nothing(data_bin, tmp_path, flags,
                                                                   expected):
    save = str(tmp_path / "never")
    proc = train_on_two_ranks(data_bin, save, "--max-update", "2", *flags, check=False)
    # torch prefixes what a rank prints to stderr with its rank
    proc.stderr = proc.stderr.replace("[rank0]: ", "")
    assert expected in error_line(proc)
    assert not os.path.exists(save) or not os.listdir(save)


def test_fairscale_dispatch_trains_and_saves_every_expert(data_bin, tmp_path):
    save = str(tmp_path / "fairscale")
    proc = train_on_two_ranks(data_bin, save, "--max-update", "3", "--moe-dispatch", "fairscale")
    assert len(losses(proc)) == 3
    model = whole_model(os.path.join(save, "checkpoint_last.pt"))
    assert model["decoder.layers.0.fc1.experts.fc1_weight"].size(0) == 4


@pytest.mark.parametrize("flags", [["--zero-sharding", "os"], []], ids=["oss", "plain"])
def test_every_expert_on_every_rank_trains_the_one_process_model_with_zero_sharding(
        data_bin, tmp_path, flags):
    # the experts are replicas (P = 1): OSS may shard their optimizer state as any weight's
    one = losses(train_on_one_rank(data_bin, str(tmp_path / "one"), "--max-update", "4"))
    proc = train_on_two_ranks(data_bin, str(tmp_path / "two"), "--max-update", "4",
                              "--moe-expert-parallel-size", "1", *flags)
    assert len(one) == 4 and losses(proc) == one


def test_bmuf_with_every_expert_on_every_rank_trains_and_saves(data_bin, tmp_path):
    # BMUF averages every parameter over all ranks at each global sync: right where
    # every expert is a replica (P = 1); with P > 1 it is refused (the test above)
    save = str(tmp_path / "bmuf")
    proc = train_on_two_ranks(data_bin, save, "--max-update", "4", "--use-bmuf",
                              "--global-sync-iter", "2", "--warmup-iterations", "2",
                              "--moe-expert-parallel-size", "1")
    rows = losses(proc)
    assert len(rows) == 4 and all(0 < loss < 20 for _, loss in rows)
    model = whole_model(os.path.join(save, "checkpoint_last.pt"))
    assert model["decoder.layers.0.fc1.experts.fc1_weight"].size(0) == 4
