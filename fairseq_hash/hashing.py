"""Hash functions: fixed maps from a token (and its context) to an expert.

Hash Layers (Roller, Sukhbaatar, Szlam, Weston, NeurIPS 2021, arXiv 2106.04426)
route the token at position t to expert ``hash(x_t)``, where ``x_t`` is the
*input token id*, not the hidden state. The hash is fixed before training: it is
kept as a table in the model's state dict, so evaluation, generation and
fine-tuning route every token exactly as training did.

    fn = build_hash_function("balanced")
    table = fn.build_table(dictionary, total_experts=16, num_hashes=1, seed=1)  # [R, N]
    experts = fn.route(table, RouteInputs.from_tokens(tokens, pad, eos))        # [B, T, N]
    table = fn.build_topk_table(dictionary, total_experts=16, k=2, seed=1)       # [R, k]

A hash function is one small class, registered by name with
:func:`register_hash`. It builds a table of expert ids once (``[R, N]``: R rows,
one column per hash of MultiHash) and maps the token context to experts by
looking rows up. Padding is always sent to expert 0 (its outputs never reach a
loss); end-of-sentence, beginning-of-sentence and unknown are ordinary tokens.

The types (``--hash-type``), by what they look at:

    random      x_t            seeded uniform table               [V, N]
    balanced    x_t            greedy over dict.txt counts        [V, N]
    clustered   x_t            k-means cluster of x_t's embedding [V, N]  (from a file)
    dispersed   x_t            k-means clusters spread out        [V, N]  (from a file)
    previous    x_{t-1}        the balanced table                 [V, N]
    future      x_{t+1}        the balanced table (an oracle)     [V, N]
    bigram      x_{t-1}, x_t   balanced(x_t) + offset(x_{t-1})    [V, 2N]
    position    t              t mod K, permuted per hash         [K, N]

``--hash-topk k`` sends each token to k distinct experts (``build_topk_table``;
a table's columns are then the k slots of a token, where MultiHash's are its
N hashes): random draws k distinct experts, balanced gives each token the k
lightest experts in its greedy pass, the context hashes look the balanced top-k
table up on their context token (bigram shifts all k slots by one offset),
position takes k evenly spaced experts, and the embedding tables come from
files (``fairseq-hash-table --topk``).

Context is defined once, in :meth:`RouteInputs.from_tokens`, from the tokens
the decoder receives, so training, ``fairseq-eval-lm`` and incremental
decoding (which receives the whole prefix) route alike: the token before the
first one of a sequence is end-of-sentence (fairseq's start symbol), the
position is the count of non-padding tokens before a token, and the token
after the last one is end-of-sentence. ``future`` therefore sees the label at
every position but the last of a block; it is for analysis, and refuses
incremental decoding, where the next token is not known.
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


def build_hash_function(name: str, total_experts: int = 0) -> "HashFunction":
    """An instance of the hash type ``name``; bigram needs ``total_experts`` to route."""
    if name not in HASH_REGISTRY:
        raise HashConfigError(
            f"--hash-type {name!r} is unknown; valid: {', '.join(sorted(HASH_REGISTRY))}"
        )
    return HASH_REGISTRY[name](total_experts)


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
        # so that right padding (eval-lm) and left padding see the same future
        nxt = nxt.masked_fill(nxt.eq(pad_idx), eos_idx)
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
    columns_per_hash = 1  # table columns of one hash
    token_rows = True  # one row per dictionary symbol (else any number, e.g. positions)

    def __init__(self, total_experts: int = 0):
        self.total_experts = total_experts

    def build_table(self, dictionary, total_experts: int, num_hashes: int, seed: int):
        """Return a LongTensor ``[R, num_hashes]`` of expert ids in [0, total_experts)."""
        raise NotImplementedError

    def build_topk_table(self, dictionary, total_experts: int, k: int, seed: int):
        """Return ``[R, k]`` (``[R, 2k]`` for bigram): k distinct experts per route."""
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

    def build_table(self, dictionary, total_experts, num_hashes, seed):
        self.total_experts = total_experts
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(total_experts, (len(dictionary), num_hashes), generator=gen)

    def build_topk_table(self, dictionary, total_experts, k, seed):
        self.total_experts = total_experts
        gen = torch.Generator().manual_seed(seed)
        # the first k of a uniform random permutation per row: k distinct draws
        keys = torch.rand(len(dictionary), total_experts, generator=gen, dtype=torch.float64)
        return keys.argsort(dim=1)[:, :k]


def greedy_balance(counts: torch.Tensor, total_experts: int, slots: int = 1) -> torch.Tensor:
    """Most frequent token first, each into the ``slots`` currently lightest experts.

    Returns ``[V]`` for one slot, else ``[V, slots]`` (lightest expert first).
    Ties break by token id, then by expert id, so the table is deterministic.
    Each of a token's slots adds its count to its expert. The loads of any two
    experts then differ by at most the largest count (a token only ever lifts
    the lightest ones), so the heaviest expert's load is at most the ideal
    share plus one token's count, for any number of slots.
    """
    order = sorted(range(len(counts)), key=lambda i: (-float(counts[i]), i))
    heap = [(0.0, e) for e in range(total_experts)]
    table = torch.zeros(len(counts), slots, dtype=torch.long)
    for token in order:
        lightest = [heapq.heappop(heap) for _ in range(slots)]
        table[token] = torch.tensor([expert for _, expert in lightest])
        for load, expert in lightest:
            heapq.heappush(heap, (load + float(counts[token]), expert))
    return table[:, 0] if slots == 1 else table


@register_hash("balanced")
class BalancedHash(HashFunction):
    """Greedy balance of the dictionary's unigram counts over the experts.

    MultiHash (N > 1) needs N different tables: hash m balances the tokens in
    a seeded random order within each count, so ties (the long tail of rare
    tokens) are broken differently by each hash while every table stays balanced.
    """

    def build_table(self, dictionary, total_experts, num_hashes, seed):
        self.total_experts = total_experts
        counts = token_counts(dictionary)
        columns = [greedy_balance(counts, total_experts)]
        for m in range(1, num_hashes):
            gen = torch.Generator().manual_seed(seed + m)
            perm = torch.randperm(len(counts), generator=gen)
            # a stable sort by count within the permuted order breaks ties anew
            column = torch.empty(len(counts), dtype=torch.long)
            column[perm] = greedy_balance(counts[perm], total_experts)
            columns.append(column)
        return torch.stack(columns, dim=1)

    def build_topk_table(self, dictionary, total_experts, k, seed):
        self.total_experts = total_experts
        return greedy_balance(token_counts(dictionary), total_experts, slots=k).view(-1, k)


class _ContextTokenHash(BalancedHash):
    """The balanced table, looked up on a token of the context other than x_t."""

    def context(self, inputs: RouteInputs) -> torch.Tensor:
        raise NotImplementedError

    def route(self, table, inputs):
        experts = table[self.context(inputs)]  # [B, T, N]
        return experts.masked_fill(inputs.pad.unsqueeze(-1), 0)


@register_hash("previous")
class PreviousHash(_ContextTokenHash):
    """Route x_t by the token before it, x_{t-1} (end-of-sentence at a start)."""

    def context(self, inputs):
        return inputs.prev_tokens


@register_hash("future")
class FutureHash(_ContextTokenHash):
    """Route x_t by the token after it, x_{t+1}: in a language model, the label.

    An oracle for analysis only (the paper's "future" hash): it trains and
    evaluates, and refuses incremental decoding, where x_{t+1} is unknown.
    """

    def context(self, inputs):
        if inputs.next_tokens is None:
            raise HashConfigError(
                "--hash-type future routes each token by the next one, which generation "
                "does not know; it is an analysis oracle: use fairseq-eval-lm, or train "
                "with another --hash-type to generate"
            )
        return inputs.next_tokens


@register_hash("bigram")
class BigramHash(BalancedHash):
    """Route x_t by the pair (x_{t-1}, x_t), without a V x V table.

    The table ``[V, 2N]`` holds two columns per hash m: column m is the
    balanced expert of the current token, column N + m a seeded random offset
    of the previous token, and the pair goes to ``(balanced[x_t] +
    offset[x_{t-1}]) mod K``. After any one previous token the current tokens
    are thus spread exactly as the balanced hash spreads them (a cyclic shift
    of it), while one token is sent to different experts after different
    predecessors; two pairs that differ in either token collide with
    probability 1/K over the offsets' draw.
    """

    columns_per_hash = 2

    def build_table(self, dictionary, total_experts, num_hashes, seed):
        current = super().build_table(dictionary, total_experts, num_hashes, seed)
        gen = torch.Generator().manual_seed(seed)
        offset = torch.randint(total_experts, (len(dictionary), num_hashes), generator=gen)
        return torch.cat([current, offset], dim=1)

    def build_topk_table(self, dictionary, total_experts, k, seed):
        # one offset shifts all k slots alike, so they stay distinct: [V, 2k]
        current = super().build_topk_table(dictionary, total_experts, k, seed)
        gen = torch.Generator().manual_seed(seed)
        offset = torch.randint(total_experts, (len(dictionary), 1), generator=gen)
        return torch.cat([current, offset.expand(-1, k)], dim=1)

    def route(self, table, inputs):
        if self.total_experts < 1:
            raise ValueError("a bigram hash routes modulo K: build it with total_experts")
        n = table.size(1) // 2
        experts = (table[inputs.tokens, :n] + table[inputs.prev_tokens, n:]) % self.total_experts
        return experts.masked_fill(inputs.pad.unsqueeze(-1), 0)


@register_hash("position")
class PositionHash(HashFunction):
    """Route x_t by its position t alone: expert ``table[t mod R]``.

    The built table has R = K rows: hash 0 sends position t to expert t mod K,
    hash m > 0 to a seeded permutation of that. A table of any R rows may be
    brought in a file (positions wrap around modulo R).
    """

    token_rows = False

    def build_table(self, dictionary, total_experts, num_hashes, seed):
        self.total_experts = total_experts
        gen = torch.Generator().manual_seed(seed)
        columns = [torch.arange(total_experts)]
        for _ in range(1, num_hashes):
            columns.append(torch.randperm(total_experts, generator=gen))
        return torch.stack(columns, dim=1)

    def build_topk_table(self, dictionary, total_experts, k, seed):
        # slot j of position t: t + j * (K // k), k evenly spaced experts; each
        # column is a cyclic shift, so every expert serves k of the K rows
        self.total_experts = total_experts
        t = torch.arange(total_experts).unsqueeze(1)
        return (t + torch.arange(k) * (total_experts // k)) % total_experts

    def route(self, table, inputs):
        experts = table[inputs.positions % table.size(0)]
        return experts.masked_fill(inputs.pad.unsqueeze(-1), 0)


class _EmbeddingHash(HashFunction):
    """Token tables computed from a trained model's input embeddings.

    They need a checkpoint, so they are built by ``fairseq-hash-table`` into
    a table file and trained with ``--hash-file``. Hash m of MultiHash runs
    k-means from seed + m.
    """

    def build_table(self, dictionary, total_experts, num_hashes, seed):
        raise HashConfigError(
            f"--hash-type {self.name} is computed from a trained model's embeddings: build "
            f"a table with `fairseq-hash-table {self.name} --checkpoint CKPT --experts "
            f"{total_experts} --output FILE` and train with --hash-file FILE"
        )

    build_topk_table = build_table

    def table_from_embeddings(self, embeddings, counts, total_experts, num_hashes, seed,
                              num_clusters=None, topk=1):
        """``embeddings [V, d]``, ``counts [V]`` -> table ``[V, num_hashes]`` (or ``[V, topk]``).

        The k-means lives with the table builders, in ``embedding_tables.py``.
        """
        from .embedding_tables import embedding_table

        self.total_experts = total_experts
        return embedding_table(self.name, embeddings, counts, total_experts, num_hashes, seed,
                               num_clusters, topk)


@register_hash("clustered")
class ClusteredHash(_EmbeddingHash):
    """One k-means cluster of input embeddings per expert: similar tokens share one."""


@register_hash("dispersed")
class DispersedHash(_EmbeddingHash):
    """The clustered hash's clusters, each spread over as many experts as it can be."""


def expected_load(table: torch.Tensor, counts: torch.Tensor, total_experts: int):
    """Expected share of tokens per expert ``[N, K]`` under a token table ``[V, N]``."""
    shares = []
    for column in table.t():
        load = torch.zeros(total_experts, dtype=torch.float64)
        load.index_add_(0, column, counts.to(torch.float64))
        shares.append(load / load.sum().clamp(min=1))
    return torch.stack(shares)


def dictionary_fingerprint(dictionary) -> int:
    """A stable 60-bit fingerprint of a dictionary's symbols, in order."""
    digest = hashlib.sha1("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return int(digest[:15], 16)
