"""Offloaded experts (--hash-offload-experts): the same scores and hypotheses as a
resident model, a cache within its bound, prefetch that loads ahead, one-line errors."""
import os
import subprocess

import pytest
import torch
from fairseq.data import Dictionary

from hashfns_util import (BIN, hashfns_corpus, hashfns_data_dir, hashfns_user_dir)
from fairseq_hash.cli.bench.offload import save_untrained_checkpoint
from fairseq_hash import expert_shards
from fairseq_hash.errors import HashConfigError
from fairseq_hash.hashing import build_hash_function
from fairseq_hash.offload import (ExpertCache, ExpertSource, OffloadedExperts,
                                  parse_cache_size)
from fairseq_hash.offload.mapped import backing_file, file_mappings, populate
from fairseq_hash.table_file import save_table_file

ARCH = ["--task", "language_modeling", "--arch", "hash_transformer_lm", "--decoder-layers", "3",
        "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
        "--decoder-attention-heads", "2", "--hash-experts", "4", "--dropout", "0", "--cpu",
        "--tokens-per-sample", "64", "--hash-layer", "0,2"]


def save_checkpoint(folder, data, *extra):
    """A fairseq checkpoint of a freshly built model (no training needed to compare)."""
    return save_untrained_checkpoint(os.path.join(folder, "checkpoint.pt"), [data, *ARCH, *extra])


def hub(path, data, **overrides):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    return TransformerLanguageModel.from_pretrained(os.path.dirname(path),
                                                    os.path.basename(path), data,
                                                    **overrides).eval()


def padded_batch(d, lengths, left=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = torch.full((len(lengths), max(lengths)), d.pad())
    for b, n in enumerate(lengths):
        row = torch.randint(d.nspecial, len(d), (n,), generator=gen)
        row[0] = d.eos()
        if left:
            batch[b, batch.size(1) - n:] = row
        else:
            batch[b, :n] = row
    return batch


def scores(lm, batch):
    with torch.no_grad():
        return lm.models[0](batch)[0]


def beam5(lm, d, seed=1):
    prompts = [row[1:] for row in padded_batch(d, [4, 6, 3], seed=seed)]
    out = lm.generate(prompts, beam=5, max_len_b=6)
    return [[(h["tokens"].tolist(), h["score"].item(), h["positional_scores"].tolist())
             for h in hyps] for hyps in out]


def table_file(folder, data, hash_type):
    d = Dictionary.load(os.path.join(data, "dict.txt"))
    path = os.path.join(folder, f"{hash_type}.json")
    table = build_hash_function("random", 4).build_table(d, 4, 1, seed=5)
    save_table_file(path, table, hash_type, 4, d, source="a test")
    return path


HASH_TYPES = ["balanced", "random", "bigram", "previous", "position", "future", "clustered",
              "dispersed"]


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_offloaded_scores_and_beam5_equal_the_resident_model(tmp_path, hash_type):
    data = hashfns_data_dir(str(tmp_path / "data"))
    extra = ["--hash-type", hash_type]
    if hash_type in ("clustered", "dispersed"):
        extra += ["--hash-file", table_file(str(tmp_path), data, hash_type)]
    path = save_checkpoint(str(tmp_path / "ckpt"), data, *extra)
    resident = hub(path, data)
    d = resident.task.dictionary
    batches = [padded_batch(d, [9, 5, 7]), padded_batch(d, [9, 5, 7], left=True)]
    want = [scores(resident, b) for b in batches]
    want_beam = beam5(resident, d) if hash_type != "future" else None
    # cache 2 of a layer's 4 experts: a batch's experts load in turns
    for mode, cache in (("prefetch", "2"), ("prefetch", "0"), ("demand", "3")):
        lm = hub(path, data, hash_offload_experts=mode, hash_expert_cache=cache)
        assert isinstance(lm.models[0].decoder.layers[0].fc1.experts, OffloadedExperts)
        for batch, expected in zip(batches, want):
            assert torch.equal(scores(lm, batch), expected), (mode, cache)
        if want_beam is not None:  # future is an oracle: it refuses to generate
            assert beam5(lm, d) == want_beam, (mode, cache)


@pytest.mark.parametrize("extra", [["--router", "switch"], ["--router", "top2"],
                                   ["--hash-topk", "2", "--hash-score", "softmax"],
                                   ["--hash-shared-experts", "1"]])
def test_learned_routers_and_topk_offload_on_demand_with_equal_outputs(tmp_path, extra):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, *extra)
    resident = hub(path, data)
    d = resident.task.dictionary
    batch = padded_batch(d, [9, 5, 7])
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="3")
    assert torch.equal(scores(lm, batch), scores(resident, batch))
    assert beam5(lm, d) == beam5(resident, d)


def cache_of(lm):
    return lm.models[0].decoder.expert_cache


def test_prefetch_loads_every_expert_before_the_layer_asks(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "random")
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="8")
    batch = padded_batch(lm.task.dictionary, [9, 5, 7])
    scores(lm, batch)
    stats = cache_of(lm).stats
    route_experts = sum(len(torch.unique(moe.last_indices))
                        for moe in lm.models[0].decoder.moe_layers.values())
    assert stats["demand_loads"] == 0 and stats["loads"] == route_experts
    scores(lm, batch)  # both layers' experts fit: nothing is read again
    assert cache_of(lm).stats["loads"] == route_experts

    demand = hub(path, data, hash_offload_experts="demand", hash_expert_cache="8")
    scores(demand, batch)
    assert cache_of(demand).stats["demand_loads"] == route_experts


@pytest.mark.parametrize("cache", ["1", "3", "0.009MB"])
def test_resident_experts_stay_within_the_cache_bound(tmp_path, cache):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "bigram")
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache=cache)
    d = lm.task.dictionary
    for seed in range(3):
        scores(lm, padded_batch(d, [9, 5, 7], seed=seed))
    beam5(lm, d)
    c = cache_of(lm)
    expert = 2 * 16 * 32 * 4 + (16 + 32) * 4  # fp32 bytes of one expert
    kind, value = parse_cache_size(cache)
    bound = value * expert if kind == "experts" else value
    assert 0 < c.stats["peak_bytes"] <= bound
    assert c.stats["turns"] > 0  # a layer needed more than the cache holds


def small_cache(experts, capacity):
    """A prefetching cache of one layer ``"a"`` of tiny experts held in memory."""
    K = experts
    tensors = dict(fc1_weight=torch.randn(K, 3, 2), fc1_bias=torch.randn(K, 3),
                   fc2_weight=torch.randn(K, 2, 3), fc2_bias=torch.randn(K, 2))
    cache = ExpertCache(capacity, prefetch=True)
    cache.add_source("a", ExpertSource(tensors, "a"))
    cache.set_target(torch.float32, torch.device("cpu"))
    return cache, tensors


def test_belady_eviction_keeps_what_the_plan_uses_next():
    cache, tensors = small_cache(4, "2")
    for e in (0, 1):
        cache.release(("a", e)) if cache.get(("a", e)) else None
    # the plan uses 1 before 0: loading 2 must evict 0
    cache.planned.extend([("a", 2), ("a", 1), ("a", 0)])
    with cache.cond:
        key, entry = cache._next_to_load()
    assert key == ("a", 2) and set(cache.entries) == {("a", 1), ("a", 2)}
    cache._fill(key, entry)
    assert torch.equal(cache.get(("a", 2)).rows[0], tensors["fc1_weight"][2])


def test_a_loaded_expert_is_served_where_it_is_mapped_and_given_back_when_dropped(tmp_path):
    """On Linux (MADV_POPULATE_READ) the cache holds the mapped rows themselves, no copy."""
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "random")
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="2")
    cache = cache_of(lm)
    scores(lm, padded_batch(lm.task.dictionary, [9, 5, 7]))
    if not populate(next(iter(cache.sources.values())).pieces[0][0][1][0]):
        pytest.skip("this kernel cannot map pages on request (MADV_POPULATE_READ)")
    mappings = file_mappings()
    assert cache.entries and all(backing_file(row, mappings) == path
                                 for entry in cache.entries.values() for row in entry.rows)
    given_back = []
    for source in cache.sources.values():
        source.forget = lambda expert, rows, s=source: given_back.append((s.name, expert))
    kept = list(cache.entries)
    cache.add_source(kept[0][0], cache.sources[kept[0][0]])  # drops that layer's experts
    assert given_back == [k for k in kept if k[0] == kept[0][0]]


def test_experts_of_another_dtype_than_the_file_are_copied_and_score_as_resident(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "random")
    resident = hub(path, data).to(torch.bfloat16)
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="3").to(torch.bfloat16)
    batch = padded_batch(resident.task.dictionary, [9, 5, 7])
    assert torch.equal(scores(lm, batch), scores(resident, batch))
    mappings = file_mappings()
    rows = [row for entry in cache_of(lm).entries.values() for row in entry.rows]
    assert rows and all(row.dtype == torch.bfloat16 and backing_file(row, mappings) is None
                        for row in rows)


def test_the_loader_waits_for_a_computing_turn_rather_than_evict_what_the_plan_reads_again():
    cache, _ = small_cache(4, "2")
    cache.get(("a", 0))  # pinned by the turn computing; the plan does not use it again
    cache.release(("a", 1)) if cache.get(("a", 1)) else None
    cache.planned.extend([("a", 2), ("a", 1)])
    cache.computing = True
    with cache.cond:
        assert cache._next_to_load() is None  # expert 1 is read again if evicted now
    cache.computing = False
    cache.release(("a", 0))
    with cache.cond:
        key, _ = cache._next_to_load()
    assert key == ("a", 2) and set(cache.entries) == {("a", 1), ("a", 2)}


def test_the_loader_asks_the_kernel_to_read_planned_experts_in_plan_order_once():
    cache, _ = small_cache(6, "3")
    cache.release(("a", 4)) if cache.get(("a", 4)) else None  # loaded: nothing to read
    cache.planned.extend([("a", 5), ("a", 4), ("a", 0), ("a", 3), ("a", 1)])
    with cache.cond:
        # a cache's worth (3 experts) beyond what is loaded, in plan order
        assert cache._to_read_ahead() == [("a", 5), ("a", 0), ("a", 3)]
        assert cache._to_read_ahead() == []  # asked once
        cache.planned.popleft()
        cache._insert(("a", 5), cache.expert_bytes("a")).ready = True
        assert cache._to_read_ahead() == [("a", 1)]


def test_experts_mapped_from_several_files_load_like_one(tmp_path):
    """A loader that maps per-rank shard files hands over mapped tensors: they serve as is."""
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "previous")
    resident = hub(path, data)
    state = torch.load(path, map_location="cpu")
    model = state["model"]
    for layer in (0, 2):  # each layer's experts in a file of their own, mapped
        prefix = f"decoder.layers.{layer}.fc1.experts."
        part = {k: v for k, v in model.items() if k.startswith(prefix)}
        torch.save(part, str(tmp_path / f"shard{layer}.pt"))
        model.update(torch.load(str(tmp_path / f"shard{layer}.pt"), mmap=True))
    lm = hub(path, data, hash_offload_experts="demand")
    lm.models[0].load_state_dict(model)
    sources = cache_of(lm).sources
    assert sorted({f for s in sources.values() for f in s.files}) == \
        [str(tmp_path / "shard0.pt"), str(tmp_path / "shard2.pt")]
    batch = padded_batch(resident.task.dictionary, [9, 5, 7])
    assert torch.equal(scores(lm, batch), scores(resident, batch))


def test_a_sharded_checkpoint_serves_offloaded_as_its_one_file_checkpoint(tmp_path):
    """Each expert stack split over two shard files and an index, as an expert-parallel
    run writes them: the experts are read from the mapped shards."""
    data = hashfns_data_dir(str(tmp_path / "data"))
    one_file = save_checkpoint(str(tmp_path / "one"), data, "--hash-type", "bigram")
    state = torch.load(one_file, map_location="cpu", weights_only=False)
    keys = [k for k in state["model"] if ".experts." in k]
    folder, tag, written = tmp_path / "sharded", "e1-u1-ab", []
    folder.mkdir()
    for shard in range(2):  # experts [0, 2) and [2, 4)
        name = expert_shards.shard_name(tag, shard, 2)
        rows = {k: [2 * shard, 2, 4] for k in keys}
        torch.save(expert_shards.shard_contents(
            tag, shard, 2, model={k: state["model"][k][2 * shard:2 * shard + 2].clone()
                                  for k in keys}, rows=rows, optimizer={}), folder / name)
        written.append({"shard": shard, "file": name, "bytes": os.path.getsize(folder / name),
                        "rows": rows})
    for k in keys:
        del state["model"][k]
    state[expert_shards.INDEX] = expert_shards.build_index(tag, written, {})
    torch.save(state, folder / "checkpoint.pt")
    resident = hub(one_file, data)
    lm = hub(str(folder / "checkpoint.pt"), data, hash_offload_experts="prefetch",
             hash_expert_cache="3")
    assert cache_of(lm).sources["decoder.layers.0.fc1.experts"].files == sorted(
        str(folder / w["file"]) for w in written)
    d = resident.task.dictionary
    batch = padded_batch(d, [9, 5, 7])
    assert torch.equal(scores(lm, batch), scores(resident, batch))
    assert beam5(lm, d) == beam5(resident, d)


# --- through fairseq's tools -------------------------------------------------------------

def run_tool(name, *args, stdin=None, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([os.path.join(BIN, name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


OVERRIDES = "{'hash_offload_experts': 'prefetch', 'hash_expert_cache': '2'}"


@pytest.fixture(scope="module")
def corpus_checkpoint(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    corpus = hashfns_corpus(str(base / "hashfns_corpus"))
    return corpus, save_checkpoint(str(base / "offload_cli"), corpus, "--hash-type", "bigram")


def test_eval_lm_word_scores_equal_with_model_overrides(corpus_checkpoint):
    corpus, path = corpus_checkpoint
    common = ["--path", path, "--user-dir", hashfns_user_dir(), "--cpu", "--output-word-probs",
              "--max-tokens", "256", "--tokens-per-sample", "32"]
    resident = run_tool("fairseq-eval-lm", corpus, *common)
    offloaded = run_tool("fairseq-eval-lm", corpus, *common, "--model-overrides", OVERRIDES)

    def words(proc):  # per-word log-probs ("3 v4 [-5.1234] ...") and the loss line
        lines = (proc.stdout + proc.stderr).splitlines()
        return [l for l in lines if l.startswith("INFO:fairseq_cli.eval_lm:")
                and "{'_name'" not in l and "Evaluated" not in l
                and "model params" not in l]  # experts are no parameters when offloaded

    assert len(words(resident)) > 10 and words(offloaded) == words(resident)
    # fairseq-eval-lm's batches pass through offload/lookahead.py
    announced = "each next batch's experts are announced ahead"
    assert announced in offloaded.stdout + offloaded.stderr
    assert announced not in resident.stdout + resident.stderr


def test_interactive_beam5_hypotheses_equal_with_model_overrides(corpus_checkpoint):
    corpus, path = corpus_checkpoint
    common = [corpus, "--task", "language_modeling", "--path", path, "--user-dir",
              hashfns_user_dir(), "--cpu", "--beam", "5", "--nbest", "5", "--max-len-b", "8"]
    prompts = "v3 v4\nv10\nv1 v2 v3\n"

    def hypotheses(proc):
        return [l for l in proc.stdout.splitlines() if l[:2] in ("H-", "P-")]

    resident = hypotheses(run_tool("fairseq-interactive", *common, stdin=prompts))
    offloaded = hypotheses(run_tool("fairseq-interactive", *common, "--model-overrides",
                                    OVERRIDES, stdin=prompts))
    assert len(resident) == 30 and offloaded == resident


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["lots", "1.5", "-3", "12TB"])
def test_a_bad_cache_size_is_one_line(value):
    with pytest.raises(HashConfigError, match="--hash-expert-cache"):
        parse_cache_size(value)


def test_a_cache_smaller_than_one_expert_and_an_unknown_mode_are_refused(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data)
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="1KB")
    with pytest.raises(HashConfigError, match="--hash-expert-cache 0.000977MB holds no expert"):
        scores(lm, padded_batch(lm.task.dictionary, [5]))
    with pytest.raises(HashConfigError, match="--hash-offload-experts 'always' is unknown"):
        hub(path, data, hash_offload_experts="always")


def error_line(proc):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_fairseqs_checkpoint_reader_is_wrapped_once_also_for_offload():
    import inspect

    from fairseq import checkpoint_utils
    from fairseq_hash import distributed_checkpoints

    reader = checkpoint_utils.load_checkpoint_to_cpu
    distributed_checkpoints.install_checkpoint_loading()  # again: still one wrapper
    assert checkpoint_utils.load_checkpoint_to_cpu is reader
    assert inspect.getfile(reader) == inspect.getfile(distributed_checkpoints)
    assert inspect.getfile(reader.__wrapped__) == inspect.getfile(checkpoint_utils)


def test_a_truncated_checkpoint_is_refused_in_one_line_naming_it(corpus_checkpoint, tmp_path):
    corpus, path = corpus_checkpoint
    cut = str(tmp_path / "cut.pt")
    with open(path, "rb") as f, open(cut, "wb") as out:
        out.write(f.read()[: os.path.getsize(path) // 2])
    proc = run_tool("fairseq-eval-lm", corpus, "--path", cut, "--user-dir", hashfns_user_dir(),
                    "--cpu", "--model-overrides", OVERRIDES, check=False)
    assert f"{cut}: not a readable checkpoint" in error_line(proc)


def test_a_missing_checkpoint_is_refused_naming_it(corpus_checkpoint, tmp_path):
    corpus, _ = corpus_checkpoint
    gone = str(tmp_path / "gone.pt")
    proc = run_tool("fairseq-eval-lm", corpus, "--path", gone, "--user-dir", hashfns_user_dir(),
                    "--cpu", "--model-overrides", OVERRIDES, check=False)
    assert proc.returncode != 0 and f"Model file not found: {gone}" in proc.stderr


def test_an_expert_file_truncated_while_serving_is_refused_naming_it(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data)
    lm = hub(path, data, hash_offload_experts="demand", hash_expert_cache="1")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(HashConfigError, match=f"expert file {path} is truncated"):
        scores(lm, padded_batch(lm.task.dictionary, [5]))


def test_offloaded_models_refuse_training(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data)
    lm = hub(path, data, hash_offload_experts="prefetch")
    with pytest.raises(HashConfigError, match="is for inference"):
        lm.models[0].decoder.layers[0].fc1.experts.train()


def test_generate_on_an_encoder_decoder_model_equals_resident(tmp_path):
    """fairseq-generate, beam 5, on a hash_transformer: encoder and decoder offloaded alike."""
    from models_util import TINY_SEQ2SEQ, seq2seq_data

    data = seq2seq_data(str(tmp_path), lines=200)
    path = save_untrained_checkpoint(str(tmp_path / "checkpoint.pt"),
                                     [data, *TINY_SEQ2SEQ, "--dropout", "0", "--cpu"])
    common = [data, "--path", path, "--user-dir", hashfns_user_dir(), "--cpu", "--beam", "5",
              "--nbest", "2", "--max-len-b", "10", "--batch-size", "16"]

    def hypotheses(proc):
        return sorted(l for l in proc.stdout.splitlines() if l[:2] in ("H-", "P-"))

    resident = hypotheses(run_tool("fairseq-generate", *common))
    offloaded = hypotheses(run_tool("fairseq-generate", *common, "--model-overrides",
                                    "{'hash_offload_experts': 'prefetch', "
                                    "'hash_expert_cache': '3'}"))
    assert len(resident) > 20 and offloaded == resident


@pytest.mark.parametrize("values, message", [
    (dict(offload_experts="always"), "--hash-offload-experts 'always' is unknown"),
    (dict(offload_experts="prefetch", expert_cache="lots"), "--hash-expert-cache 'lots'"),
    (dict(offload_experts="prefetch", num_hashes=2), "does not support --hash-count > 1"),
])
def test_offload_flags_that_cannot_be_served_are_one_line_errors(values, message):
    from fairseq_hash.spec import HashLayerSpec

    with pytest.raises(HashConfigError, match=message):
        HashLayerSpec(**values).validate(ffn_dim=32)


class FakeUse:
    """A CUDA event's ``query``/``synchronize``, for the device's last use of an expert."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_an_expert_the_device_still_reads_keeps_its_bytes_until_it_is_done():
    """(CUDA) the host runs ahead: an expert dropped while the device may still read it
    counts against the bound until its last use is done, and room waits for that."""
    cache, tensors = small_cache(4, "2")
    for e in (0, 1):
        cache.get(("a", e))
        cache.release(("a", e))
    uses = {e: FakeUse() for e in (0, 1)}
    for e, use in uses.items():
        cache.entries[("a", e)].used = use
    full = cache.stats["resident_bytes"]
    with cache.cond:
        cache._drop(("a", 0))  # dropped, but the device still reads it
    assert cache.stats["resident_bytes"] == full and len(cache.retiring) == 1
    with cache.cond:  # room for one: waits for the device's use of 0, keeps 1 loaded
        assert cache._make_room(cache.expert_bytes("a"), before=None)
        cache._insert(("a", 2), cache.expert_bytes("a"))
    assert uses[0].done and not cache.retiring and ("a", 1) in cache.entries
    uses[1].done = True
    with cache.cond:  # one whose use is done goes at once
        cache._drop(("a", 1))
    assert not cache.retiring and cache.stats["resident_bytes"] == cache.expert_bytes("a")
    assert cache.stats["peak_bytes"] <= cache.capacity


def test_loaders_stop_before_the_process_exits(tmp_path):
    from fairseq_hash.offload import cache as cache_module

    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data)
    lm = hub(path, data, hash_offload_experts="prefetch", hash_expert_cache="2")
    scores(lm, padded_batch(lm.task.dictionary, [9, 5, 7]))
    loader = cache_of(lm).loader
    assert loader is not None and loader.is_alive()  # idle, waiting for the next plan
    cache_module._stop_loaders()  # what atexit runs
    assert not loader.is_alive() and cache_of(lm).loader is None
