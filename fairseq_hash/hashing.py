"""Hash functions: fixed maps from a token (and its context) to an expert.

Hash Layers (Roller, Sukhbaatar, Szlam, Weston, NeurIPS 2021, arXiv 2106.04426)
route the token at position t to expert ``hash(x_t)``, where ``x_t`` is the
*input token id*, not the hidden state. The hash is fixed before training: it is
kept as a table in the model's state dict, so evaluation, generation and
fine-tuning route every token exactly as training did.

    fn = build_hash_function("balanced")
    table = fn.build_table(dictionary, num_experts=16, num_hashes=1, seed=1)  # [R, N]
    experts = fn.route(table, RouteInputs.from_tokens(tokens, pad, eos))      # [B, T, N]

A hash function is one small class, registered by name with
:func:`register_hash`. It builds a table of expert ids once (``[R, N]``: R rows,
one column per hash of MultiHash) and maps the token context to experts by
looking rows up. Padding is always sent to expert 0 (its outputs never reach a
loss); end-of-sentence, beginning-of-sentence and unknown are ordinary tokens.
"""
import hashlib
import heapq
from dataclasses import dataclass
from typing import Dict, Optional, Type

import torch

from .errors import HashConfigError

HASH_REGISTRY: Dict[str, Type["HashFunction"]] = {}


def register_hash(name: str):
    def wrap(cls):
        if name in HASH_REGISTRY:
            raise ValueError(f"hash type {name!r} is registered twice")
        cls.name = name
        HASH_REGISTRY[name] = cls
        return cls

    return wrap


def build_hash_function(name: str) -> "HashFunction":
    if name not in HASH_REGISTRY:
        raise HashConfigError(
            f"--hash-type {name!r} is unknown; valid: {', '.join(sorted(HASH_REGISTRY))}"
        )
    return HASH_REGISTRY[name]()


@dataclass
class RouteInputs:
    """What a hash may look at, for each position of a batch (all ``[B, T]``).

    ``prev_tokens`` holds the token before each position; ``next_tokens`` is
    None where the future is unknown (incremental decoding); ``pad`` marks
    padding.
    """

    tokens: torch.Tensor
    prev_tokens: torch.Tensor
    positions: torch.Tensor
    pad: torch.Tensor
    next_tokens: Optional[torch.Tensor] = None
    incremental: bool = False

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, pad_idx: int, eos_idx: int):
        """Route inputs of a whole batch ``[B, T]`` (left or right padded).

        Position counts the non-padding tokens before a token; the token before
        the first one of a sequence is end-of-sentence, fairseq's start symbol.
        """
        pad = tokens.eq(pad_idx)
        prev = torch.cat([tokens.new_full((tokens.size(0), 1), eos_idx), tokens[:, :-1]], 1)
        prev = prev.masked_fill(prev.eq(pad_idx), eos_idx)
        nxt = torch.cat([tokens[:, 1:], tokens.new_full((tokens.size(0), 1), eos_idx)], 1)
        positions = ((~pad).long().cumsum(1) - 1).clamp(min=0)
        return cls(tokens=tokens, prev_tokens=prev, positions=positions, pad=pad, next_tokens=nxt)

    def last(self) -> "RouteInputs":
        """The last position only, as in incremental decoding: no future known."""
        return RouteInputs(
            tokens=self.tokens[:, -1:],
            prev_tokens=self.prev_tokens[:, -1:],
            positions=self.positions[:, -1:],
            pad=self.pad[:, -1:],
            next_tokens=None,
            incremental=True,
        )


class HashFunction:
    """Base class: one named way to map token context to experts."""

    name = "?"

    def build_table(self, dictionary, num_experts: int, num_hashes: int, seed: int):
        """Return a LongTensor ``[R, num_hashes]`` of expert ids in [0, num_experts)."""
        raise NotImplementedError

    def route(self, table: torch.Tensor, inputs: RouteInputs) -> torch.Tensor:
        """Expert ids ``[B, T, N]`` for every position; padding goes to expert 0."""
        experts = table[inputs.tokens]
        return experts.masked_fill(inputs.pad.unsqueeze(-1), 0)


def token_counts(dictionary) -> torch.Tensor:
    """Unigram counts ``[V]`` from a fairseq dictionary (dict.txt).

    dict.txt does not count end-of-sentence, although every line ends with one;
    we give it the largest count so that balanced tables place it first rather
    than last, where it would land on an already full expert.
    """
    counts = torch.tensor(dictionary.count, dtype=torch.float64)
    counts[dictionary.eos()] = counts.max()
    counts[dictionary.pad()] = 0
    return counts


@register_hash("random")
class RandomHash(HashFunction):
    """A seeded uniform random table token id -> expert (one column per hash)."""

    def build_table(self, dictionary, num_experts, num_hashes, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(num_experts, (len(dictionary), num_hashes), generator=gen)


def greedy_balance(counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Most frequent token first, each into the currently lightest expert.

    Ties break by token id, then by expert id, so the table is deterministic.
    The heaviest expert's load is at most the ideal share plus one token's count.
    """
    order = sorted(range(len(counts)), key=lambda i: (-float(counts[i]), i))
    heap = [(0.0, e) for e in range(num_experts)]
    table = torch.zeros(len(counts), dtype=torch.long)
    for token in order:
        load, expert = heapq.heappop(heap)
        table[token] = expert
        heapq.heappush(heap, (load + float(counts[token]), expert))
    return table


@register_hash("balanced")
class BalancedHash(HashFunction):
    """Greedy balance of the dictionary's unigram counts over the experts.

    MultiHash (N > 1) needs N different tables: hash m balances the tokens in
    a seeded random order within each count, so ties (the long tail of rare
    tokens) are broken differently by each hash while every table stays balanced.
    """

    def build_table(self, dictionary, num_experts, num_hashes, seed):
        counts = token_counts(dictionary)
        columns = [greedy_balance(counts, num_experts)]
        for m in range(1, num_hashes):
            gen = torch.Generator().manual_seed(seed + m)
            perm = torch.randperm(len(counts), generator=gen)
            # a stable sort by count within the permuted order breaks ties anew
            column = torch.empty(len(counts), dtype=torch.long)
            column[perm] = greedy_balance(counts[perm], num_experts)
            columns.append(column)
        return torch.stack(columns, dim=1)


def expected_load(table: torch.Tensor, counts: torch.Tensor, num_experts: int):
    """Expected share of tokens per expert ``[N, K]`` under a token table ``[V, N]``."""
    shares = []
    for column in table.t():
        load = torch.zeros(num_experts, dtype=torch.float64)
        load.index_add_(0, column, counts.to(torch.float64))
        shares.append(load / load.sum().clamp(min=1))
    return torch.stack(shares)


def dictionary_fingerprint(dictionary) -> int:
    """A stable 60-bit fingerprint of a dictionary's symbols, in order."""
    digest = hashlib.sha1("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return int(digest[:15], 16)
