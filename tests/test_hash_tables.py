"""Balanced and random token -> expert tables."""
import torch
from fairseq.data import Dictionary

from fairseq_hash.hashing import build_hash_function, expected_load, token_counts


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
