"""Every hash type of the paper: the balanced and random tables, what each type routes by,
and the same routing at every stage."""
import pytest
import torch
from fairseq.data import Dictionary

from hashfns_util import hashfns_data_dir, hashfns_dictionary, hashfns_model, hashfns_tokens
from fairseq_hash.errors import HashConfigError
from fairseq_hash.hashing import (HASH_REGISTRY, RouteInputs, build_hash_function, expected_load,
                                  token_counts)
from fairseq_hash.table_file import save_table_file

K = 4


def route(name, tokens, d, table=None, num_hashes=1):
    fn = build_hash_function(name, K)
    if table is None:
        table = fn.build_table(d, K, num_hashes, seed=1)
    return fn.route(table, RouteInputs.from_tokens(tokens, d.pad(), d.eos())), table


def zipf_dictionary(n=300):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"tok{i}", n=int(10000 / (i + 1)) + 1)
    return d


def test_balanced_routes_every_token_to_a_valid_expert():
    d = zipf_dictionary()
    table = build_hash_function("balanced").build_table(d, 8, 1, seed=1)
    assert table.shape == (len(d), 1)
    assert table.min() >= 0 and table.max() < 8
    assert set(table[:, 0].tolist()) == set(range(8))


def test_balanced_heaviest_expert_within_greedy_bound():
    d = zipf_dictionary()
    counts = token_counts(d)
    for k in (2, 4, 16, 64):
        table = build_hash_function("balanced").build_table(d, k, 1, seed=1)
        share = expected_load(table, counts, k)[0]
        largest_token = (counts / counts.sum()).max()
        assert share.max() <= 1.0 / k + largest_token + 1e-12


def test_balanced_is_deterministic():
    d = zipf_dictionary()
    fn = build_hash_function("balanced")
    assert torch.equal(fn.build_table(d, 16, 1, seed=1), fn.build_table(d, 16, 1, seed=99))


def test_random_reproducible_by_seed_and_seeds_differ():
    d = zipf_dictionary()
    fn = build_hash_function("random")
    a, b, c = (fn.build_table(d, 16, 1, seed=s) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 16


def test_padding_goes_to_expert_zero():
    from fairseq_hash.hashing import RouteInputs

    d = zipf_dictionary()
    fn = build_hash_function("random")
    table = fn.build_table(d, 16, 1, seed=5)
    tokens = torch.tensor([[d.pad(), 10, 11], [12, 13, d.pad()]])
    experts = fn.route(table, RouteInputs.from_tokens(tokens, d.pad(), d.eos()))
    assert experts[0, 0, 0] == 0 and experts[1, 2, 0] == 0
    assert experts[0, 1, 0] == table[10, 0] and experts[1, 0, 0] == table[12, 0]


def test_bigram_routes_a_token_by_its_predecessor():
    d = hashfns_dictionary()
    token = 20
    predecessors = range(d.nspecial, len(d))
    tokens = torch.tensor([[p, token] for p in predecessors])
    experts, _ = route("bigram", tokens, d)
    after = experts[:, 1, 0]
    assert after.unique().numel() > 1  # the same token, different experts
    again, _ = route("bigram", tokens.flip(0), d)
    assert torch.equal(again[:, 1, 0], after.flip(0))  # the same pair, the same expert


def test_bigram_spreads_current_tokens_like_balanced_after_any_predecessor():
    d = hashfns_dictionary()
    fn = build_hash_function("bigram", K)
    table = fn.build_table(d, K, 1, seed=1)
    balanced = build_hash_function("balanced").build_table(d, K, 1, seed=1)
    assert torch.equal(table[:, :1], balanced)
    counts = token_counts(d)
    for prev in (5, 17):
        experts = (table[:, 0] + table[prev, 1]) % K  # every current token after prev
        load = torch.zeros(K, dtype=torch.float64).index_add_(0, experts, counts)
        base = torch.zeros(K, dtype=torch.float64).index_add_(0, balanced[:, 0], counts)
        assert sorted(load.tolist()) == sorted(base.tolist())


def test_previous_routes_by_the_token_before():
    d = hashfns_dictionary()
    tokens = torch.tensor([[5, 20, 7, 20], [9, 20, 30, 31]])
    experts, table = route("previous", tokens, d)
    assert experts[0, 1, 0] == table[5, 0] and experts[0, 3, 0] == table[7, 0]
    assert experts[1, 1, 0] == table[9, 0]
    assert experts[0, 0, 0] == table[d.eos(), 0]  # a sequence's start: after </s>
    # token 20 after 5 and after 7, where the table separates them
    assert table[5, 0] != table[7, 0] or table[5, 0] != table[9, 0]
    assert experts[:, 1:, 0][tokens[:, 1:] == 20].unique().numel() > 1


def test_position_routes_by_index():
    d = hashfns_dictionary()
    tokens = torch.randint(d.nspecial, len(d), (2, 11))
    experts, _ = route("position", tokens, d)
    assert torch.equal(experts[0, :, 0], torch.arange(11) % K)
    # left padding does not shift positions
    padded = torch.cat([torch.full((2, 3), d.pad()), tokens], 1)
    shifted, _ = route("position", padded, d)
    assert torch.equal(shifted[:, 3:], experts)
    assert (shifted[:, :3] == 0).all()


def test_future_routes_by_the_next_token():
    d = hashfns_dictionary()
    tokens = torch.tensor([[5, 20, 7, d.pad()]])
    experts, table = route("future", tokens, d)
    assert experts[0, 0, 0] == table[20, 0] and experts[0, 1, 0] == table[7, 0]
    assert experts[0, 2, 0] == table[d.eos(), 0]  # before padding: end-of-sentence


def test_future_refuses_incremental_decoding():
    d = hashfns_dictionary()
    fn = build_hash_function("future", K)
    table = fn.build_table(d, K, 1, seed=1)
    inputs = RouteInputs.from_tokens(torch.tensor([[2, 5, 6]]), d.pad(), d.eos()).last()
    with pytest.raises(HashConfigError, match="generation"):
        fn.route(table, inputs)


def blobs(sizes, dim=8, seed=0):
    """Points in well-separated blobs ``[sum(sizes), dim]`` and each point's blob."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=gen) * 50
    points = torch.cat([c + torch.randn(n, dim, generator=gen) for c, n in zip(centres, sizes)])
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return points, labels


def test_clustered_puts_a_cluster_on_one_expert():
    points, labels = blobs([10, 7, 12, 5])
    counts = torch.ones(len(labels))
    table = build_hash_function("clustered").table_from_embeddings(points, counts, K, 1, seed=3)
    for blob in range(4):
        assert table[labels == blob, 0].unique().numel() == 1
    assert table[:, 0].unique().numel() == 4  # four blobs, four experts


def test_dispersed_puts_no_two_members_of_a_cluster_on_one_expert():
    points, labels = blobs([4, 3, 4, 2, 4, 1], dim=6)
    counts = torch.arange(len(labels), 0, -1).double()
    fn = build_hash_function("dispersed")
    table = fn.table_from_embeddings(points, counts, K, 1, seed=3, num_clusters=6)
    for blob in range(6):
        members = table[labels == blob, 0]
        assert members.unique().numel() == members.numel()


def test_dispersed_spreads_a_large_cluster_evenly():
    points, labels = blobs([10, 9], dim=4)
    table = build_hash_function("dispersed").table_from_embeddings(
        points, torch.ones(19), K, 1, seed=0, num_clusters=2)
    for blob in range(2):
        per_expert = torch.bincount(table[labels == blob, 0], minlength=K)
        assert per_expert.max() - per_expert.min() <= 1


def test_clustered_without_a_file_is_a_clear_error():
    with pytest.raises(HashConfigError, match="fairseq-hash-table clustered"):
        build_hash_function("clustered").build_table(hashfns_dictionary(), K, 1, seed=1)


def test_unknown_hash_type_names_the_valid_ones():
    with pytest.raises(HashConfigError, match="bigram.*position"):
        build_hash_function("nope")


def embedding_table_file(tmp_path, name, dictionary, num_hashes=1):
    fn = build_hash_function(name)
    emb = torch.randn(len(dictionary), 8, generator=torch.Generator().manual_seed(0))
    table = fn.table_from_embeddings(emb, token_counts(dictionary), K, num_hashes, seed=1)
    path = str(tmp_path / f"{name}.json")
    save_table_file(path, table, name, K, dictionary)
    return path


def incremental_logits(model, tokens):
    state, steps = {}, []
    for t in range(tokens.size(1)):
        steps.append(model.decoder(tokens[:, : t + 1], incremental_state=state)[0])
    return torch.cat(steps, 1)  # [B, T, V]


@pytest.mark.parametrize("name", sorted(set(HASH_REGISTRY) - {"future"}))
@pytest.mark.parametrize("count", [1, 2])
def test_incremental_decoding_equals_the_full_forward(tmp_path, name, count):
    data = hashfns_data_dir(str(tmp_path / "data"))
    extra = ["--hash-type", name, "--hash-layer", "0,1", "--hash-count", count]
    if name in ("clustered", "dispersed"):
        d = Dictionary.load(f"{data}/dict.txt")
        extra += ["--hash-file", embedding_table_file(tmp_path, name, d, count)]
    model, d = hashfns_model(data, *extra)
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        full = model(tokens)[0]
        steps = incremental_logits(model, tokens)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_future_model_evaluates_but_refuses_to_generate(tmp_path):
    model, d = hashfns_model(hashfns_data_dir(str(tmp_path)), "--hash-type", "future")
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        assert torch.isfinite(model(tokens)[0]).all()
        with pytest.raises(HashConfigError, match="--hash-type future"):
            incremental_logits(model, tokens)
