"""A training step reads no device value inside a hash layer, and adds at most one read
to fairseq's own per forward pass (the dispatch plan of all hash layers)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_MODEL
from host_reads import HostReads, training_step
from models_util import build_in_process
from test_expert_parallel import env, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def without_hash_flags(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--hash-"):
            skip = True
        else:
            out.append("transformer_lm" if a == "hash_transformer_lm" else a)
    return out


def reads_of_one_step(data_bin, *flags, pad=True, model_flags=TINY_MODEL):
    model, task = build_in_process([data_bin, *model_flags, "--dropout", "0", *flags])
    model.train()
    torch.manual_seed(0)
    tokens = torch.randint(4, len(task.dictionary), (3, 16))
    if pad:
        tokens[1, 10:] = task.dictionary.pad()
    with HostReads() as reads:
        training_step(model, tokens)
    return reads


@pytest.mark.parametrize("flags", [
    [], ["--hash-count", "2"], ["--hash-topk", "2", "--hash-score", "softmax"],
    ["--hash-shared-experts", "1"], ["--checkpoint-activations"],
], ids=["plain", "multihash", "topk-score", "shared", "checkpoint-activations"])
def test_a_hash_model_step_reads_nothing_inside_hash_layers(data_bin, flags):
    dense = reads_of_one_step(data_bin, model_flags=without_hash_flags(TINY_MODEL))
    hashed = reads_of_one_step(data_bin, *flags)
    assert hashed.inside == []
    assert len(hashed.planned) == 1  # one plan for both hash layers
    assert hashed.total - dense.total <= 1, hashed.reads


def test_a_learned_router_reads_its_counts_once_a_layer(data_bin):
    reads = reads_of_one_step(data_bin, "--router", "switch", "--criterion", "moe_cross_entropy")
    assert len([r for r in reads.reads if r[0] == "tolist"]) == 2  # two routed layers


def test_two_expert_parallel_ranks_read_once_per_forward_and_never_inside_a_layer(
        data_bin, tmp_path):
    port, out = free_port(), str(tmp_path / "reads")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "host_reads_worker.py"),
                               str(rank), str(port), data_bin, out],
                              env=env(), stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    for rank in range(2):
        reads = torch.load(f"{out}.{rank}.pt")
        assert reads["inside"] == [] and reads["planned"] == 1, reads
