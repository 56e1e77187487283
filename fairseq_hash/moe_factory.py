"""Build one routed FFN layer (router, experts, exchange) from a ``HashLayerSpec``.

    spec = HashLayerSpec(total_experts=16, hash_type="balanced")
    moe = build_hash_moe(spec, dictionary, layer_idx=0, embed_dim=512, ffn_dim=2048)
    y = moe(x, RouteInputs.from_tokens(tokens, pad, eos))   # x: [T, B, d]

Knows no model: fairseq's layers are changed to call the result in
``models/fairseq_surgery.py``. The spec is taken as validated
(``HashLayerSpec.validate``); ``layer_idx`` seeds the layer's random table and
initial weights.
"""
import os

import torch

from .expert_parallel import (AllToAllExchange, ExpertGradientSync, expert_layout,
                              fail_on_out_of_memory, world_size)
from .experts import ExpertFFN
from .fairscale_dispatch import FairscaleExchange
from .hashing import build_hash_function, dictionary_fingerprint
from .moe_layer import MoELayer
from .multihash import MultiHashRouter, SegmentedExpertFFN
from .routers import HashRouter, build_learned_router
from .scores import HashScoreGate
from .shared_experts import SharedExpertMoELayer, SharedExperts
from .spec import HashLayerSpec
from .table_file import load_table_file


def build_hash_router(spec: HashLayerSpec, dictionary, layer_idx: int, gate=None) -> HashRouter:
    """The layer's table: built for ``dictionary``, read from ``--hash-file``, or awaited
    from a checkpoint where that file is gone."""
    K, N, k = spec.total_experts, spec.num_hashes, spec.topk
    hash_fn = build_hash_function(spec.hash_type, K)
    router_cls = HashRouter if N == 1 else MultiHashRouter
    extra = dict(topk=k, gate=gate) if N == 1 else {}
    fingerprint = dictionary_fingerprint(dictionary)
    if spec.hash_file and not os.path.exists(spec.hash_file):
        # fairseq rebuilds a model from its saved flags before loading its
        # weights, and the table is among them: a moved file is not needed then
        return router_cls.awaiting_checkpoint(hash_fn, K, fingerprint, spec.hash_file,
                                              max(N, k), **extra)
    seed = spec.hash_seed + layer_idx
    if spec.hash_file:
        # one table from the file serves every hash layer
        table = load_table_file(spec.hash_file, dictionary, spec.hash_type, K, N, k)
    elif k > 1:
        table = hash_fn.build_topk_table(dictionary, K, k, seed)
    else:
        table = hash_fn.build_table(dictionary, K, num_hashes=N, seed=seed)
    return router_cls(hash_fn, table, K, fingerprint, **extra)


def build_exchange(spec: HashLayerSpec, layout, experts):
    """How tokens reach experts on other ranks (None on one process or P = 1)."""
    if layout is None or layout.parallel_size == 1:
        return None
    if spec.dispatch == "fairscale":
        return FairscaleExchange(layout, experts)
    return AllToAllExchange(layout, exact=spec.dispatch == "alltoall-exact")


def build_hash_moe(spec: HashLayerSpec, dictionary, layer_idx: int, embed_dim: int,
                   ffn_dim: int, sync_gradients: bool = True) -> MoELayer:
    """The routed layer that replaces an FFN of width ``ffn_dim`` on ``embed_dim`` features.

    ``sync_gradients``: the layer's own ExpertGradientSync under expert
    parallelism (HashLayers gives all layers of a side one instead)."""
    world = world_size()
    layout = expert_layout(spec.parallel_size_for(world)) if world > 1 else None
    K, N = spec.total_experts, spec.num_hashes
    if not spec.learned:
        gate = None if spec.score == "none" else HashScoreGate(
            embed_dim, K, spec.score, spec.score_scale)
        router = build_hash_router(spec, dictionary, layer_idx, gate)
    # Experts and learned routers draw from generators of their own, seeded by
    # --seed (fairseq's torch seed) and the layer: the shared weights and
    # fairseq's random stream (dropout) stay exactly those of transformer_lm.
    seed = torch.initial_seed() + 7919 * (layer_idx + 1)
    shard = dict(shard=layout.shard, num_shards=layout.parallel_size) if layout else {}
    width = spec.expert_width(ffn_dim)
    if N == 1:
        experts = ExpertFFN(K, embed_dim, width, seed=seed, **shard)
    else:
        experts = SegmentedExpertFFN(K, embed_dim, width, N, seed=seed, **shard)
    if spec.learned:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, restored after
            torch.default_generator.manual_seed(seed)
            router = build_learned_router(spec.router, embed_dim, K, spec.capacity_factor)
    if layout is not None:
        if sync_gradients:
            ExpertGradientSync(layout).register(experts.parameters())
        fail_on_out_of_memory()  # its collectives must not be skipped on one rank
    exchange = build_exchange(spec, layout, experts)
    if spec.shared_experts:
        with torch.random.fork_rng(devices=[]):  # a generator of their own, as the router's
            torch.default_generator.manual_seed(seed + 1)
            shared = SharedExperts(spec.shared_experts, embed_dim, spec.shared_width(ffn_dim))
        moe = SharedExpertMoELayer(router, experts, shared, exchange)
    else:
        moe = MoELayer(router, experts, exchange)
    moe.layout = layout  # None on one process
    return moe
