"""The implementations ``fairseq-hash-bench`` times against the hash layer, built alike.

    built, notes = build_case(["dense", "hash", "naive"], 8192, 16, 512, 2048, torch.float32, cpu)
    built["hash"].step()            # forward and backward of one FFN sublayer

Every implementation gets the same input, output gradient and, where it has
experts, the same expert weights:

- ``dense``: one FFN of the same shape on all S tokens;
- ``floor``: K dense FFNs, each on its own S/K tokens (separate leaf inputs): no
  routing, no permutation, only the smaller products and K weight gradients
  that any dispatch must pay; the limit a hash layer is measured against;
- ``hash``: this project's layer (``MoELayer`` + ``HashRouter`` + ``ExpertFFN``)
  with a seeded random hash over a 32,000-token vocabulary;
- ``hash-serial``: the same layer computing its experts one after another, each
  product with all threads (``FAIRSEQ_HASH_EXPERT_THREADS=1``), as ``floor``
  does: the cost of the dispatch alone, beside ``floor``;
- ``naive``: a Python loop over the experts that selects each expert's tokens
  with a boolean mask over all S tokens (the obvious implementation);
- ``fairscale``: fairscale's ``MOELayer`` (one-hot ``einsum`` dispatch into
  ``[S, E, C]``) driven by the same hash, in a one-process gloo group, with the
  capacity C set to the busiest expert's load so that no token is dropped;
- ``switch``, ``top2``, ``base``: the project's learned routers
  (``fairseq_hash.routers.build_learned_router``) in front of the same
  dispatch and experts;
- ``hash-top2``: the hash layer with ``--hash-topk 2 --hash-score softmax``
  (a seeded random table of 2 distinct experts a token, a learned gate);
- ``floor-top2``: K dense FFNs on 2S/K tokens each, the floor of any top-2
  layer; ``x floor`` of ``top2`` and ``hash-top2`` is against it.

``hash``, ``naive`` and ``fairscale`` route identically and compute the same
outputs.
"""
import os
import tempfile
from contextlib import contextmanager
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_IMPLS = ("dense", "floor", "hash", "hash-serial", "naive", "fairscale", "switch", "top2",
               "base", "floor-top2", "hash-top2")
# the floor each routed layer's "x floor" is taken against: top-2 layers compute 2S rows
FLOOR_OF = {"top2": "floor-top2", "hash-top2": "floor-top2", "floor-top2": "floor-top2"}
LEARNED_ROUTERS = ("switch", "top2", "base")
VOCAB = 32000


# ----------------------------------------------------------------------------
# The implementations compared with the hash layer


class DenseFFN(nn.Module):
    """``fc2(relu(fc1(x)))``, the FFN sublayer of a Transformer layer."""

    def __init__(self, embed_dim, ffn_dim):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def dense_copies(experts, count=None) -> nn.ModuleList:
    """A DenseFFN per expert of an ExpertFFN (the first ``count``), with its weights."""
    K, f, d = experts.fc1_weight.shape
    copies = nn.ModuleList(DenseFFN(d, f) for _ in range(count or K))
    with torch.no_grad():
        for e, ffn in enumerate(copies):
            ffn.fc1.weight.copy_(experts.fc1_weight[e])
            ffn.fc1.bias.copy_(experts.fc1_bias[e])
            ffn.fc2.weight.copy_(experts.fc2_weight[e])
            ffn.fc2.bias.copy_(experts.fc2_bias[e])
    return copies.to(experts.fc1_weight.dtype)


class NaiveMoE(nn.Module):
    """For each expert, mask all S tokens, gather its own, compute, scatter back."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        self.experts = experts

    def forward(self, x, expert_ids):
        # x: [S, d], expert_ids: [S]
        y = x.new_zeros(x.shape)
        for e, expert in enumerate(self.experts):
            mask = expert_ids == e  # [S] bool
            if mask.any():
                y[mask] = expert(x[mask])
        return y


class FixedGate(nn.Module):
    """A gate for fairscale's MOELayer that routes by given expert ids.

    Returns fairscale's ``(l_aux, combine_weights [S, E, C], dispatch_mask
    [S, E, C])`` with C the busiest expert's load: nothing is dropped.
    """

    def __init__(self, expert_ids, total_experts):
        super().__init__()
        self.expert_ids = expert_ids
        self.total_experts = total_experts

    def forward(self, x):
        ids = self.expert_ids
        one_hot = F.one_hot(ids, self.total_experts)  # [S, E]
        slot = (one_hot.cumsum(0) - 1).gather(1, ids.unsqueeze(1)).squeeze(1)  # [S]
        capacity = int(one_hot.sum(0).max())
        dispatch = torch.zeros(x.size(0), self.total_experts, capacity, dtype=torch.bool,
                               device=x.device)
        dispatch[torch.arange(x.size(0), device=x.device), ids, slot] = True
        return x.new_zeros(()), dispatch.to(x.dtype), dispatch


def one_process_group(device: torch.device):
    """fairscale's MOELayer needs a process group even on one worker."""
    import torch.distributed as dist

    if not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="fairseq-hash-bench-")
        os.close(fd)
        os.unlink(path)  # the file store creates it
        # gloo's all-to-all takes CPU tensors only
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)
    return dist.group.WORLD


# ----------------------------------------------------------------------------
# One benchmark case: S tokens, K experts, all implementations on equal inputs


@contextmanager
def environment(env: Dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Impl:
    """A step: ``run()`` returns the outputs and their gradients, in ``env``."""

    def __init__(self, name, modules, inputs, run, env=None):
        self.name, self.modules, self.inputs, self.run = name, modules, inputs, run
        self.params = [p for m in modules for p in m.parameters()]
        self.env = env or {}

    def step(self):
        for t in self.params + self.inputs:
            t.grad = None
        with environment(self.env):
            outputs, grads = self.run()
            torch.autograd.backward(outputs, grads)


def build_case(impls, tokens, experts, embed_dim, ffn_dim, dtype, device, seed=1):
    """Impl objects for every name in ``impls`` that can run; notes for the rest."""
    from fairseq_hash.experts import ExpertFFN
    from fairseq_hash.hashing import RandomHash, RouteInputs
    from fairseq_hash import routers
    from fairseq_hash.moe_layer import MoELayer
    from fairseq_hash.routers import HashRouter
    from fairseq_hash.scores import HashScoreGate

    S, K, d, f = tokens, experts, embed_dim, ffn_dim
    batch = 8 if S % 8 == 0 else 1
    gen = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(4, VOCAB, (batch, S // batch), generator=gen)  # [B, T]
    route = RouteInputs.from_tokens(token_ids, pad_idx=1, eos_idx=2)
    route = RouteInputs(**{k: (v.to(device) if torch.is_tensor(v) else v)
                           for k, v in vars(route).items()})
    table = torch.randint(K, (VOCAB, 1), generator=gen)
    x0 = torch.randn(S // batch, batch, d, generator=gen).to(device, dtype)  # [T, B, d]
    grad_out = torch.randn(S // batch, batch, d, generator=gen).to(device, dtype)
    torch.manual_seed(seed)
    experts_ffn = ExpertFFN(K, d, f).to(device, dtype)
    hash_router = HashRouter(RandomHash(), table, K, dict_fingerprint=0).to(device)
    expert_ids = hash_router(x0.view(S, d), route).indices[:, 0]  # [S], time-major

    def leaf(t):
        return t.detach().clone().requires_grad_()

    built: Dict[str, Impl] = {}
    notes: Dict[str, str] = {}
    for name in impls:
        try:
            if name == "dense":
                ffn = dense_copies(experts_ffn, count=1)[0].to(device)
                x = leaf(x0.view(S, d))
                built[name] = Impl(name, [ffn], [x],
                                   lambda ffn=ffn, x=x: ([ffn(x)], [grad_out.view(S, d)]))
            elif name in ("floor", "floor-top2"):
                copies = 2 if name == "floor-top2" else 1  # every token computed twice
                ffns = dense_copies(experts_ffn).to(device)
                xs = [leaf(p) for p in torch.tensor_split(x0.view(S, d).repeat(copies, 1), K)]
                gs = list(torch.tensor_split(grad_out.view(S, d).repeat(copies, 1), K))
                built[name] = Impl(name, [ffns], xs, lambda ffns=ffns, xs=xs, gs=gs: (
                    [ffn(x) for ffn, x in zip(ffns, xs)], gs))
            elif name == "hash-top2":
                # build_topk_table reads only the length of its dictionary
                table2 = RandomHash().build_topk_table(range(VOCAB), K, 2, seed)
                gate = HashScoreGate(d, K, "softmax")
                nn.init.normal_(gate.weight, std=d ** -0.5, generator=gen)
                router = HashRouter(RandomHash(), table2, K, 0, topk=2, gate=gate)
                moe = MoELayer(router.to(device, dtype), experts_ffn)
                x = leaf(x0)
                built[name] = Impl(name, [moe], [x],
                                   lambda moe=moe, x=x: ([moe(x, route)], [grad_out]))
            elif name in ("hash", "hash-serial"):
                moe = MoELayer(hash_router, experts_ffn)
                x = leaf(x0)
                env = {"FAIRSEQ_HASH_EXPERT_THREADS": "1"} if name == "hash-serial" else {}
                built[name] = Impl(name, [moe], [x],
                                   lambda moe=moe, x=x: ([moe(x, route)], [grad_out]), env)
            elif name == "naive":
                naive = NaiveMoE(dense_copies(experts_ffn)).to(device)
                x = leaf(x0.view(S, d))
                built[name] = Impl(name, [naive], [x], lambda naive=naive, x=x: (
                    [naive(x, expert_ids)], [grad_out.view(S, d)]))
            elif name == "fairscale":
                if S % K:
                    raise ValueError(f"fairscale's MOELayer needs tokens ({S}) divisible by "
                                     f"the experts ({K})")
                from fairscale.nn.moe import MOELayer

                layer = MOELayer(FixedGate(expert_ids, K), dense_copies(experts_ffn).to(device),
                                 group=one_process_group(device))
                x = leaf(x0.view(K, S // K, d))
                built[name] = Impl(name, [layer], [x], lambda layer=layer, x=x: (
                    [layer(x)], [grad_out.view(K, S // K, d)]))
            elif name in LEARNED_ROUTERS:
                router = routers.build_learned_router(name, d, K).to(device, dtype)
                torch.manual_seed(seed)
                moe = MoELayer(router, ExpertFFN(K, d, f).to(device, dtype))
                x = leaf(x0)
                built[name] = Impl(name, [moe], [x],
                                   lambda moe=moe, x=x: ([moe(x, route)], [grad_out]))
            else:
                raise ValueError(f"unknown implementation {name!r}; "
                                 f"valid: {', '.join(LAYER_IMPLS)}")
            built[name].modules[0].train()
        except Exception as err:  # one failing row must not end the benchmark
            notes[name] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    return built, notes
