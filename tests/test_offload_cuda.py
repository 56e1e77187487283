"""Offloaded experts on a CUDA device: experts pinned in host memory, copied on the
loader's side stream. The same scores and beam-5 hypotheses as the resident model
on that device, and a device cache within its bound. Skipped without CUDA (CI has
none); benchmarks/gpu_check.sh runs them on a GPU."""
import pytest
import torch

from hashfns_util import hashfns_data_dir
from test_offload import beam5, cache_of, hub, padded_batch, save_checkpoint, scores
from fairseq_hash.offload import OffloadedExperts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda(lm, dtype=None):
    lm = lm.cuda()
    return lm.to(dtype) if dtype is not None else lm


@pytest.mark.parametrize("extra", [["--hash-type", "balanced"], ["--hash-type", "bigram"],
                                   ["--hash-type", "position"], ["--router", "switch"],
                                   ["--hash-topk", "2", "--hash-score", "softmax"]])
@pytest.mark.parametrize("mode,cache", [("prefetch", "2"), ("prefetch", "0"), ("demand", "3")])
def test_offloaded_on_cuda_equals_resident_on_cuda(tmp_path, extra, mode, cache):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, *extra)
    resident = on_cuda(hub(path, data))
    d = resident.task.dictionary
    batches = [padded_batch(d, [9, 5, 7]).cuda(), padded_batch(d, [9, 5, 7], left=True).cuda()]
    want = [scores(resident, b) for b in batches]
    want_beam = beam5(resident, d)
    lm = on_cuda(hub(path, data, hash_offload_experts=mode, hash_expert_cache=cache))
    experts = lm.models[0].decoder.layers[0].fc1.experts
    assert isinstance(experts, OffloadedExperts)
    for batch, expected in zip(batches, want):
        got = scores(lm, batch)
        assert got.device.type == "cuda"
        assert torch.equal(got, expected), (mode, cache, float((got - expected).abs().max()))
    assert beam5(lm, d) == want_beam


def test_bf16_offloaded_on_cuda_equals_resident_bf16(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "balanced")
    resident = on_cuda(hub(path, data), torch.bfloat16)
    d = resident.task.dictionary
    batch = padded_batch(d, [9, 5, 7]).cuda()
    want = scores(resident, batch)
    lm = on_cuda(hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="2"),
                 torch.bfloat16)
    got = scores(lm, batch)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want), float((got.float() - want.float()).abs().max())


def test_the_device_cache_stays_within_its_bound(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "bigram")
    lm = on_cuda(hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="3"))
    d = lm.task.dictionary
    for seed in range(3):
        scores(lm, padded_batch(d, [9, 5, 7], seed=seed).cuda())
    beam5(lm, d)
    stats = cache_of(lm).stats
    expert = 2 * 16 * 32 * 4 + (16 + 32) * 4  # fp32 bytes of one expert
    assert 0 < stats["peak_bytes"] <= 3 * expert
    assert stats["turns"] > 0
    loaded = [e.rows for e in cache_of(lm).entries.values() if e.rows is not None]
    assert loaded and all(t.device.type == "cuda" for rows in loaded for t in rows)
