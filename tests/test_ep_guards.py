"""What would make expert-parallel ranks disagree is refused, or ends the run, never hangs."""
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, user_dir
from fairseq_hash.errors import HashConfigError
from fairseq_hash.expert_parallel import _raising_out_of_memory
from fairseq_hash.spec import HashLayerSpec
from test_expert_parallel import BY_HAND, EXACT, env, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("settings, expected", [
    (dict(layerdrop=(("--encoder-layerdrop", 0.2),)), "--encoder-layerdrop 0.2: LayerDrop skips"),
    (dict(store_ema=True), "--store-ema copies the model"),
    (dict(eval_bleu=True), "--eval-bleu decodes each rank's sentences"),
    (dict(zero_sharding="os"), "--zero-sharding os: fairscale's OSS takes every rank's"),
    (dict(use_bmuf=True), "--use-bmuf averages every parameter over all ranks"),
])
def test_paths_that_differ_between_ranks_are_refused_with_experts_spread(settings, expected):
    spec = HashLayerSpec(total_experts=4, **settings)
    spec.validate(world_size=1)  # one process: nothing to pair up
    with pytest.raises(HashConfigError, match=expected):
        spec.validate(world_size=2)


def test_every_expert_on_every_rank_keeps_ema_bleu_oss_and_bmuf_but_not_layerdrop():
    HashLayerSpec(total_experts=4, parallel_size=1, store_ema=True, eval_bleu=True,
                  zero_sharding="os", use_bmuf=True).validate(world_size=2)
    # replicas all-reduce their experts' gradients in every backward
    spec = HashLayerSpec(total_experts=4, parallel_size=1,
                         layerdrop=(("--decoder-layerdrop", 0.1),))
    with pytest.raises(HashConfigError, match="--decoder-layerdrop 0.1"):
        spec.validate(world_size=2)


@pytest.mark.parametrize("experts, world, node, expected", [
    (16, 4, 4, 4),  # one node: P = W
    (16, 4, 2, 2),  # two nodes of two: groups within a node, two replicas
    (4, 8, 4, 4),  # P = K, already within a node
    (4, 8, 2, 2),
    (16, 8, 3, 1),  # three ranks a node: no group of 2 or 4 fits in one
])
def test_the_default_layout_stays_within_a_node(experts, world, node, expected):
    assert HashLayerSpec(total_experts=experts).parallel_size_for(world, node) == expected


def test_an_explicit_layout_may_span_nodes():
    assert HashLayerSpec(total_experts=16, parallel_size=4).parallel_size_for(4, 2) == 4


def test_torchruns_local_world_size_is_the_node(monkeypatch):
    from fairseq_hash.expert_parallel import ranks_per_node

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ranks_per_node(8) == 2
    assert HashLayerSpec(total_experts=8).parallel_size_for(8) == 2


def test_fairseqs_step_raises_out_of_memory_instead_of_retrying_the_batch_on_one_rank():
    asked = []

    def valid_step(trainer, sample, raise_oom=False):
        asked.append(raise_oom)  # fairseq retries the batch once unless this is True
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    step = _raising_out_of_memory(valid_step, "valid_step")
    with pytest.raises(HashConfigError, match="rank 0 ran out of device memory in a "
                                              "validation step"):
        step(None, {})
    assert asked == [True]


def test_out_of_memory_on_one_rank_ends_every_rank_with_one_line(data_bin, tmp_path):
    args = [sys.executable, os.path.join(HERE, "ep_oom_worker.py"), data_bin, "--user-dir",
            user_dir(), *TINY_MODEL, *TINY_TRAIN, *EXACT, "--save-dir", str(tmp_path / "oom"),
            *BY_HAND, "--distributed-world-size", "2", "--max-update", "4",
            "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}"]
    ranks = [subprocess.Popen(args + ["--distributed-rank", str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env()) for rank in (0, 1)]
    # fairseq's recovery would leave rank 0 waiting in the exchange: a timeout here
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode != 0 for rank in ranks] == [True, True]
    err = outputs[1][1].replace("[rank1]: ", "")
    assert ("fairseq-hash: error: rank 1 ran out of device memory in a training step" in err), \
        err[-3000:]
    assert "attempting to recover from OOM" not in outputs[1][0] + err
