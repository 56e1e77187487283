"""Routers: which experts each token goes to, and with what weight.

A router maps ``[S, d]`` hidden states (and the token context of those S
positions) to a :class:`RouterOutput`; it knows nothing of dispatch. The MoE
layer sorts tokens by ``indices``, runs the experts and combines the k outputs
of each token, weighted by ``weights`` where a router gives them.

    hash_fn = build_hash_function("balanced", 16)
    table = hash_fn.build_table(dictionary, 16, num_hashes=1, seed=1)  # [R, 1]
    router = HashRouter(hash_fn, table, 16, dictionary_fingerprint(dictionary))
    out = router(x, inputs)    # x: [S, d], inputs: RouteInputs of the S positions
    out.indices  # [S, k] expert ids; out.weights: [S, k] or None; out.aux_loss

The learned baselines the paper compares against (``--router``) follow the
same contract but look at the hidden state x, never the token ids:
:class:`SwitchRouter` (top-1 gate, capacity, load-balancing loss),
:class:`Top2Router` (GShard top-2 through fairscale's ``Top2Gate``) and
:class:`BaseRouter` (BASE layers' balanced assignment). Their weights are
shared parameters; in eval mode each routes every token deterministically.
"""
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from fairscale.nn.moe.top2gate import Top2Gate, top2gating

from .errors import HashConfigError
from .hashing import HASH_REGISTRY, HashFunction, RouteInputs
from .route import expert_counts

logger = logging.getLogger(__name__)


@dataclass
class RouterOutput:
    indices: torch.Tensor  # [S, k] long, expert of each of a token's k slots
    weights: Optional[torch.Tensor] = None  # [S, k] scale of each slot's output
    aux_loss: Optional[torch.Tensor] = None  # scalar, added to the training loss
    dropped: Optional[torch.Tensor] = None  # [S, k] bool, slots over capacity


def hash_type_id(name: str) -> int:
    """A stable 60-bit number naming a ``--hash-type``, kept in checkpoints."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:15], 16)


class HashRouter(nn.Module):
    """Hash Layers' router: a fixed table lookup on the token context.

    The table (``[R, N]`` expert ids) is a buffer, so it travels in every
    checkpoint, together with a fingerprint of the dictionary it was built
    for and the ``--hash-type`` that built it; loading it beside another
    dictionary is refused, and so is resuming it under another hash type.

    With ``topk`` k > 1 (``--hash-topk``) the table's columns are a token's k
    distinct experts, and their outputs are averaged, or weighed by ``gate``
    (a :class:`~fairseq_hash.scores.HashScoreGate`, ``--hash-score``).
    """

    def __init__(self, hash_fn: HashFunction, table: torch.Tensor, total_experts: int,
                 dict_fingerprint: int, missing_file: str = None, topk: int = 1,
                 gate: nn.Module = None):
        super().__init__()
        self.hash_fn = hash_fn
        self.total_experts = total_experts
        self.topk = topk
        self.gate = gate
        # contiguous: fairseq's broadcast of a checkpoint to the other ranks sends
        # a tensor's storage in memory order (distributed_checkpoints.install_checkpoint_loading)
        self.register_buffer("table", table.long().contiguous())
        self.register_buffer("dict_fingerprint", torch.tensor([dict_fingerprint]))
        self.register_buffer("hash_type_id", torch.tensor([hash_type_id(hash_fn.name)]))
        # a --hash-file that was not found: the table must come from a checkpoint
        self.missing_file = missing_file

    @classmethod
    def awaiting_checkpoint(cls, hash_fn, total_experts, dict_fingerprint, hash_file, choices=1,
                            **kwargs):
        """A router whose ``--hash-file`` is gone: usable once a checkpoint gives its table
        (``choices``: a token's N hashes or k experts, the table's columns per hash)."""
        table = torch.zeros(0, choices * hash_fn.columns_per_hash, dtype=torch.long)
        return cls(hash_fn, table, total_experts, dict_fingerprint, missing_file=hash_file,
                   **kwargs)

    def missing_table_error(self) -> HashConfigError:
        return HashConfigError(f"--hash-file {self.missing_file}: no such file (and no "
                               f"checkpoint gave the table it was trained with)")

    def train(self, mode: bool = True):
        # fairseq-train sets training mode first thing in its first train_step,
        # after it loaded any checkpoint (which gives the table) and outside the
        # handler that writes crash.pt: no step runs and nothing is written
        if mode and self.missing_file:
            raise self.missing_table_error()
        return super().train(mode)

    def forward(self, x: torch.Tensor, route: RouteInputs) -> RouterOutput:
        if self.missing_file:
            raise self.missing_table_error()
        experts = self.hash_fn.route(self.table, route)  # [B, T, N]
        # fairseq's layers see time-major [T, B, d] features, flattened to [T*B, d]
        indices = experts.transpose(0, 1).reshape(-1, experts.size(-1))
        weights = None
        if x is None:
            pass  # indices only: the decoder plans expert-parallel exchanges from them
        elif self.gate is not None:
            weights = self.gate(x, indices)  # [S, k]
        elif self.topk > 1:
            weights = x.new_full(indices.shape, 1.0 / self.topk, dtype=torch.float32)
        return RouterOutput(indices=indices, weights=weights)

    def upgrade_state_dict_named(self, state_dict, name):
        """Refuse a checkpoint whose table was built for another dictionary or K."""
        prefix = f"{name}." if name else ""
        table = state_dict.get(prefix + "table")
        fingerprint = state_dict.get(prefix + "dict_fingerprint")
        if table is None:
            return
        if self.missing_file and table.size(1) == self.table.size(1):
            # the checkpoint carries the table the file held: take its shape,
            # on this module's device (the checkpoint is read onto the CPU)
            self.table = self.table.new_empty(table.shape)
            self.missing_file = None
        if table.shape != self.table.shape:
            differs = (f"{table.size(0)} rows x {table.size(1)} columns, the loaded dictionary "
                       f"gives {self.table.size(0)} x {self.table.size(1)}")
        elif fingerprint is not None and int(fingerprint[0]) != int(self.dict_fingerprint[0]):
            differs = (f"as many rows as the loaded dictionary has symbols, but other symbols: "
                       f"dictionary fingerprint {int(fingerprint[0]):x}, the loaded one's "
                       f"{int(self.dict_fingerprint[0]):x}")
        else:
            differs = None
        if differs:
            raise HashConfigError(
                f"the hash table {prefix}table in the checkpoint was built for another "
                f"dictionary than the one loaded now ({differs}); load the checkpoint with "
                f"the dict.txt it was trained with"
            )
        if int(table.max()) >= self.total_experts:
            raise HashConfigError(
                f"the hash table {prefix}table routes to expert {int(table.max())} but "
                f"--hash-experts is {self.total_experts}"
            )

    def add_missing_hash_type(self, state_dict, prefix: str):
        """Give a checkpoint from before the ``--hash-type`` was recorded this router's
        type under ``prefix``, so that it loads."""
        state_dict.setdefault(f"{prefix}.hash_type_id", self.hash_type_id.clone())

    def saved_hash_type(self, state_dict, prefix: str) -> str:
        """The ``--hash-type`` that built the checkpoint's table under ``prefix``."""
        saved = int(state_dict[f"{prefix}.hash_type_id"][0])
        names = [n for n in HASH_REGISTRY if hash_type_id(n) == saved]
        return names[0] if names else f"unknown ({saved:015x})"


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``K * sum_e f_e * P_e``.

    probs: [S, K] router probabilities; top1: [S] each token's first choice.
    ``f_e`` is the share of tokens whose first choice is e, ``P_e`` the mean
    probability given to e. It is 1 at perfect balance and K when all tokens
    pick one expert.
    """
    total_experts = probs.size(1)
    share = expert_counts(top1, total_experts).to(probs.dtype) / top1.numel()
    return total_experts * torch.sum(share * probs.mean(dim=0))


def over_capacity(experts: torch.Tensor, total_experts: int, capacity: int) -> torch.Tensor:
    """``[S]`` bool: tokens whose expert already took ``capacity`` earlier tokens.

    Earlier rows win, as in Switch Transformers. Computed by a stable sort
    (the rank of each token within its expert), not a one-hot cumulative sum.
    """
    order = torch.argsort(experts, stable=True)
    counts = expert_counts(experts, total_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(experts)
    rank[order] = torch.arange(experts.numel(), device=experts.device) - starts[experts[order]]
    return rank >= capacity


class SwitchRouter(nn.Module):
    """Switch Transformers' top-1 gate (Fedus, Zoph, Shazeer, 2021).

    ``p = softmax(x W)``; each token goes to ``argmax p`` and that expert's
    output is scaled by its probability, so the gate learns through the
    output. In training an expert takes at most
    ``ceil(capacity_factor * S / K)`` tokens; later tokens are marked dropped
    and pass through the residual only. At evaluation nothing is dropped.

    Args:
        embed_dim (int): d
        total_experts (int): K
        capacity_factor (float): expert capacity in units of S/K (training only)
    """

    def __init__(self, embed_dim: int, total_experts: int, capacity_factor: float = 1.25):
        super().__init__()
        self.total_experts = total_experts
        self.capacity_factor = capacity_factor
        self.wg = nn.Linear(embed_dim, total_experts, bias=False)

    def forward(self, x: torch.Tensor, route: RouteInputs = None) -> RouterOutput:
        # the gate runs in float32 even in a half-precision model
        probs = torch.softmax(self.wg(x).float(), dim=-1)  # [S, K]
        weight, expert = probs.max(dim=-1)  # [S], [S]
        aux_loss = load_balancing_loss(probs, expert)
        dropped = None
        if self.training:
            capacity = math.ceil(self.capacity_factor * x.size(0) / self.total_experts)
            dropped = over_capacity(expert, self.total_experts, capacity).unsqueeze(1)
        return RouterOutput(indices=expert.unsqueeze(1), weights=weight.unsqueeze(1),
                            aux_loss=aux_loss, dropped=dropped)


class Top2Router(nn.Module):
    """GShard's top-2 gate (Lepikhin et al., 2020), through fairscale's ``Top2Gate``.

    In training, fairscale's ``top2gating`` chooses the experts: the first by
    ``argmax softmax(x W)``, the second by Gumbel-noised logits; capacity
    ``2S/K`` per expert, tokens over it dropped; the two weights renormalised
    over the kept slots; and its auxiliary loss ``mean_e(m_e c_e)``, which we
    multiply by K^2 so that, like Switch's, it is 1 at perfect balance.
    fairscale returns dense ``[S, K, C]`` combine weights; we reduce them to
    ``[S, 2]`` indices at once. At evaluation the two largest probabilities
    are taken without noise or capacity.

    Args:
        embed_dim (int): d
        total_experts (int): K
    """

    def __init__(self, embed_dim: int, total_experts: int):
        super().__init__()
        self.total_experts = total_experts
        self.gate = Top2Gate(embed_dim, total_experts)

    def forward(self, x: torch.Tensor, route: RouteInputs = None) -> RouterOutput:
        S, K = x.size(0), self.total_experts
        logits = self.gate.wg(x).float()  # [S, K]
        if not self.training:
            probs = torch.softmax(logits, dim=-1)
            weights, indices = probs.topk(2, dim=-1)  # [S, 2]
            weights = weights / weights.sum(dim=-1, keepdim=True)
            # fairscale's loss times K^2 is Switch's loss: logged at evaluation too
            return RouterOutput(indices=indices, weights=weights,
                                aux_loss=load_balancing_loss(probs, indices[:, 0]))
        # top2gating asserts that K divides S: append rows of equal logits, last,
        # so that they take no capacity from real tokens; they are cut off after
        pad = (-S) % K
        if pad:
            logits = torch.cat([logits, logits.new_zeros(pad, K)])
        aux_loss, combine, _ = top2gating(logits)  # combine: [S', K, C]
        expert_weight = combine[:S].sum(dim=-1)  # [S, K], zero but at kept slots
        weights, indices = expert_weight.topk(2, dim=-1)  # [S, 2]
        return RouterOutput(indices=indices, weights=weights, aux_loss=aux_loss * K * K,
                            dropped=weights.eq(0))


def greedy_balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Fallback for ``libbase.balanced_assignment`` where fairseq lacks its C++ build.

    Same contract (``[S, K]`` scores with K dividing S -> ``[S]`` token order
    grouped by expert, S/K each) but greedy, not optimal: (token, expert)
    pairs in order of falling score, each taken while the token is free and
    the expert has room.
    """
    S, K = scores.shape
    room = [S // K] * K
    expert_of = [-1] * S
    for pair in torch.argsort(scores.reshape(-1), descending=True).tolist():
        token, expert = divmod(pair, K)
        if expert_of[token] < 0 and room[expert]:
            expert_of[token] = expert
            room[expert] -= 1
    return torch.argsort(torch.tensor(expert_of), stable=True)


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """fairseq's auction solver (the one BASE layers use), or the greedy fallback."""
    try:
        from fairseq import libbase
    except ImportError:  # pragma: no cover - depends on the fairseq build
        logger.warning("fairseq.libbase is not built: --router base assigns tokens "
                       "greedily, not by the auction solver")
        return greedy_balanced_assignment(scores)
    return libbase.balanced_assignment(scores)


class BaseRouter(nn.Module):
    """BASE layers' balanced assignment (Lewis et al., ICML 2021) in one process.

    Each expert has a centroid ``c_e``; a token's affinity to e is ``x . c_e``.
    In training, fairseq's auction solver (``fairseq.libbase``; a greedy
    fallback where that is not built) assigns the S
    tokens to the K experts maximising total affinity with every expert taking
    S/K of them (when K does not divide S, a few rows, each wanting one other
    expert above any token, are appended for the solver and removed after, so
    loads differ by at most one). At evaluation each token takes its best
    expert. The expert output is scaled by ``sigmoid(x . c_e)``: BASE mixes
    ``a * (x + f(x)) + (1 - a) * x``, which is ``x + a * f(x)`` with the
    layer's residual outside. There is no
    auxiliary loss; the centroids learn through that scale. fairseq's own
    ``BaseLayer`` needs a process group and holds one expert per worker, so
    only its solver is used here.

    Args:
        embed_dim (int): d
        total_experts (int): K
    """

    def __init__(self, embed_dim: int, total_experts: int):
        super().__init__()
        self.total_experts = total_experts
        centroids = torch.empty(total_experts, embed_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)

    def forward(self, x: torch.Tensor, route: RouteInputs = None) -> RouterOutput:
        with torch.no_grad():
            scores = x.float() @ self.centroids.float().t()  # [S, K]
            expert = self.balanced(scores) if self.training else scores.argmax(dim=-1)  # [S]
        score = (x * self.centroids[expert].to(x.dtype)).sum(dim=-1, keepdim=True)  # [S, 1]
        return RouterOutput(indices=expert.unsqueeze(1), weights=torch.sigmoid(score.float()))

    def balanced(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert of each token ``[S]``; each expert takes S/K tokens (within one)."""
        S, K = scores.shape
        scores = scores.cpu()
        ok = scores.isfinite()
        if not ok.all():  # the solver never terminates on NaN
            scores = scores.masked_fill(~ok, scores[ok].min() if ok.any() else 0.0)
        pad = (-S) % K
        if pad:  # the solver needs K to divide S and loops forever otherwise
            # pad row j wants expert j above any real pair and no other: the pads
            # (fewer than K) take one place of distinct experts with either solver
            rows = scores.new_full((pad, K), float(scores.min()) - 1)
            rows[torch.arange(pad), torch.arange(pad)] = float(scores.max()) + 1
            scores = torch.cat([scores, rows])
        order = balanced_assignment(scores.contiguous())  # [S'] grouped by expert
        expert = torch.empty_like(order)
        expert[order] = torch.arange(order.numel()) // (order.numel() // K)
        return expert[:S].to(self.centroids.device)


ROUTERS = ("hash", "switch", "top2", "base")  # --router's values


def build_learned_router(name: str, embed_dim: int, total_experts: int,
                         capacity_factor: float = 1.25) -> nn.Module:
    """A learned router by its ``--router`` name (``hash`` is built from a table)."""
    if name == "switch":
        return SwitchRouter(embed_dim, total_experts, capacity_factor)
    return {"top2": Top2Router, "base": BaseRouter}[name](embed_dim, total_experts)
