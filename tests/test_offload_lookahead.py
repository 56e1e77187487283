"""The next batch's experts announced ahead (offload/lookahead.py): eval-lm's batches
pass through announce_ahead, and a decoder told the next pass's tokens loads that
pass's experts after its own, with the same scores."""
import time

import pytest
import torch

from hashfns_util import hashfns_data_dir
from test_offload import cache_of, hub, padded_batch, save_checkpoint, scores
from fairseq_hash.offload.lookahead import announce_ahead


class Side:
    """A decoder's announce_next and cache, recorded."""

    class Cache:
        prefetch = True

    expert_cache = Cache()

    def __init__(self):
        self.told = []

    def announce_next(self, tokens):
        self.told.append(tokens)


class Model:
    def __init__(self):
        self.decoder = Side()


def test_each_batch_comes_after_the_next_ones_tokens_were_announced():
    batches = [{"net_input": {"src_tokens": torch.full((1, 2), i)}} for i in range(3)]
    batches.insert(2, {})  # eval-lm's empty batch (padding of a shard): nothing to announce
    model = Model()
    seen = []
    for sample in announce_ahead(batches, [model]):
        seen.append((sample, [int(t[0, 0]) for t in model.decoder.told]))
    assert [s for s, _ in seen] == batches
    assert [told for _, told in seen] == [[1], [1], [1, 2], [1, 2]]


def test_models_that_do_not_prefetch_get_the_batches_untouched():
    model = Model()
    model.decoder.expert_cache = type("Cache", (), {"prefetch": False})()
    assert list(announce_ahead(iter([1, 2]), [model, object()])) == [1, 2]
    assert model.decoder.told == []


def wait_until_idle(cache, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        with cache.cond:
            loaded = [k for k, e in cache.entries.items() if e.ready]
            if cache._next_to_load() is None:
                return loaded
        time.sleep(0.05)
    raise AssertionError("the loader did not finish")


def test_the_next_pass_experts_load_before_it_starts_and_scores_stay_equal(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "random",
                           "--hash-experts", "8")
    resident = hub(path, data)
    d = resident.task.dictionary
    # a short first pass uses few experts; the second, more
    first, second = padded_batch(d, [2], seed=0), padded_batch(d, [9, 8, 6], seed=1)
    want = [scores(resident, b) for b in (first, second)]
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="16")
    decoder = lm.models[0].decoder
    decoder.announce_next(second)
    assert torch.equal(scores(lm, first), want[0])
    cache = cache_of(lm)
    loaded = wait_until_idle(cache)
    plans = decoder.plan_dispatch(decoder.route_inputs(second))
    needed = {(moe.experts.key, e) for idx, moe in decoder.moe_layers.items()
              for e, n in enumerate(plans[idx].counts) if n}
    assert needed <= set(loaded)  # all of the next pass's experts, before it starts
    first_pass = {(moe.experts.key, int(e)) for moe in decoder.moe_layers.values()
                  for e in moe.last_indices.unique()}
    assert needed - first_pass  # some of them the first pass did not use
    loads = cache.stats["loads"] + cache.stats["demand_loads"]
    assert torch.equal(scores(lm, second), want[1])
    assert cache.stats["loads"] + cache.stats["demand_loads"] == loads  # nothing read again


@pytest.mark.integration
def test_the_plugin_wraps_eval_lm_where_it_runs_and_imports_no_fairseq_cli():
    import subprocess
    import sys

    code = ("import sys, fairseq_hash; print('fairseq_cli.eval_lm' in sys.modules); "
            "import fairseq_cli.eval_lm as m; fairseq_hash.install_eval_lm_lookahead(); "
            "print(getattr(m.eval_lm, '_fairseq_hash', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]
