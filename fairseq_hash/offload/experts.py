"""The offloaded layer's experts: :class:`OffloadedExperts` takes the place of
``ExpertFFN`` in a MoE layer; :func:`plan_prefetch` announces a forward's
experts to the cache."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HashConfigError
from ..expert_shards import ROWS, is_rows, read_rows
from ..expert_threads import for_expert_groups
from ..experts import dropout_inactive, fused_activation
from .. import grouped_mm
from ..grouped_mm import ExpertRows
from . import cuda
from .cache import ExpertCache
from .store import EXPERT_PARAMS, ExpertSource


class OffloadedExperts(nn.Module):
    """``ExpertFFN``'s computation with weights read from an :class:`ExpertCache`.

    Holds no parameter: loading a state dict gives its four ``[K, ...]``
    tensors to the cache as this layer's source. Inference only.

    Args:
        total_experts, embed_dim, ffn_dim (int): K, d, f, as for ExpertFFN
        cache (ExpertCache): shared by the offloaded layers of one encoder or decoder
    """

    def __init__(self, total_experts: int, embed_dim: int, ffn_dim: int, cache: ExpertCache):
        super().__init__()
        self.local_experts = self.total_experts = total_experts
        self.first_expert = 0
        self.shapes = dict(fc1_weight=(total_experts, ffn_dim, embed_dim),
                           fc1_bias=(total_experts, ffn_dim),
                           fc2_weight=(total_experts, embed_dim, ffn_dim),
                           fc2_bias=(total_experts, embed_dim))
        self.cache = cache
        self.key = None  # the layer's name in the cache: its state-dict prefix
        self.activation_fn = F.relu
        self.activation_dropout = nn.Identity()
        # follows .half() and .cuda() of the model: the dtype and device to load into
        self.register_buffer("like", torch.empty(0), persistent=False)

    @property
    def bins(self) -> int:
        """Expert ids the dispatch counts (all K: offloaded layers serve on one process)."""
        return self.local_experts

    def train(self, mode: bool = True):
        if mode:
            raise HashConfigError("--hash-offload-experts is for inference (fairseq-eval-lm, "
                                  "-generate, -interactive, the hub interface), not training")
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        tensors = {}
        for name in EXPERT_PARAMS:
            value = state_dict.get(prefix + name)
            if value is None:
                missing_keys.append(prefix + name)
                continue
            if is_rows(value):  # a sharded checkpoint: each shard's rows, mapped
                value = [(first, read_rows(value, first, count))
                         for _, first, count in value[ROWS]["pieces"]]
            pieces = value if isinstance(value, list) else [(0, value)]
            shape = (sum(t.size(0) for _, t in pieces), *pieces[0][1].shape[1:])
            if shape != self.shapes[name]:
                error_msgs.append(f"size mismatch for {prefix + name}: checkpoint "
                                  f"{shape}, model {self.shapes[name]}")
            else:
                tensors[name] = value
        if len(tensors) == len(EXPERT_PARAMS):
            self.key = prefix.rstrip(".")
            self.cache.add_source(self.key, ExpertSource(tensors, self.key))

    def prepare(self):
        """Make the cache load in the model's dtype, onto its device."""
        self.cache.set_target(self.like.dtype, self.like.device)

    def forward(self, x: torch.Tensor, counts) -> torch.Tensor:
        # x: [S, d] sorted by expert; counts[e] rows for expert e (ints or ExpertRows)
        counts = ExpertRows.of(counts).counts
        if self.key is None:
            self.cache.set_target(self.like.dtype, self.like.device)  # raises: no source
        self.prepare()
        needed = [(self.key, e) for e, n in enumerate(counts) if n]
        y = x.new_empty(x.size(0), self.shapes["fc2_weight"][1])
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        turns = self.cache.turns(needed)
        if len(turns) > 1:
            self.cache.stats["turns"] += len(turns) - 1
        for turn in turns:
            entries = {}
            try:
                for key in turn:
                    entries[key[1]] = self.cache.get(key)
                lo, hi = starts[turn[0][1]], starts[turn[-1][1] + 1]
                self.cache.computing = True
                self._compute(x[lo:hi], y[lo:hi], lo, counts, entries)
            finally:
                self.cache.computing = False
                for e in entries:
                    self.cache.release((self.key, e))
        return y

    @torch.no_grad()
    def _compute(self, x, y, first_row, counts, entries):
        """The rows of the experts in ``entries`` (``x`` and ``y`` start at row
        ``first_row`` of the layer's), as ExpertFFN computes them on CPU: the
        same products, each with the threads it has when the layer's experts all
        run at once (``for_expert_groups``'s ``only``), so that they round alike."""
        if x.device.type == "cuda":
            cuda.wait_for(entries.values(), x.device)
            if grouped_mm.usable(x, next(iter(entries.values())).rows[0].unsqueeze(0)):
                return self._compute_grouped(x, y, counts, entries)
        activation = fused_activation(self.activation_fn)
        hidden = x.new_empty(x.size(0), self.shapes["fc1_weight"][1])
        if activation is not None and dropout_inactive(self.activation_dropout):
            def work(bounds):
                for e, lo, hi in bounds:
                    lo, hi = lo - first_row, hi - first_row
                    w1, b1, w2, b2 = entries[e].rows
                    h = torch.addmm(b1, x[lo:hi], w1.t(), out=hidden[lo:hi])
                    h = h.clamp_(min=0) if activation == "relu" else F.gelu(h)
                    torch.addmm(b2, h, w2.t(), out=y[lo:hi])

            for_expert_groups(x.device, counts, work, only=entries.keys())
            return

        def linear(inputs, outputs, weight, bias):
            def work(bounds):
                for e, lo, hi in bounds:
                    lo, hi = lo - first_row, hi - first_row
                    rows = entries[e].rows
                    torch.addmm(rows[bias], inputs[lo:hi], rows[weight].t(), out=outputs[lo:hi])
            return work

        for_expert_groups(x.device, counts, linear(x, hidden, 0, 1), only=entries.keys())
        hidden = self.activation_dropout(self.activation_fn(hidden))
        for_expert_groups(x.device, counts, linear(hidden, y, 2, 3), only=entries.keys())

    def _compute_grouped(self, x, y, counts, entries):
        """As ``ExpertFFN`` computes on CUDA in bf16: torch's fused grouped product, over
        the turn's experts stacked (a copy on the device), with their rows' counts."""
        order = sorted(entries)
        rows = ExpertRows([counts[e] for e in order])
        w1, b1, w2, b2 = (torch.stack([entries[e].rows[i] for e in order]) for i in range(4))
        h = self.activation_dropout(self.activation_fn(grouped_mm.linear(x, w1, b1, rows)))
        y.copy_(grouped_mm.linear(h, w2, b2, rows))


def plan_prefetch(moe_layers, plans: dict, following: Optional[dict] = None) -> dict:
    """Every offloaded hash layer's experts for one forward pass, in its ``LayerPlan``
    (``experts``), announced to the cache in the order the layers will use them;
    then, if ``following`` holds the plans of the pass after it (known ahead:
    ``offload/lookahead.py``), that pass's experts, in the same order.

    ``moe_layers`` maps layer index -> MoELayer in the order they run; ``plans``
    (layer index -> LayerPlan) hold each hash layer's counts, computed from the
    token ids before the first layer (``moe_layer.plan_hash_dispatch``): the
    experts with rows are exactly those the layer will use. Returns ``plans``.
    """
    keys, cache = [], None
    for pass_plans, this_pass in ((plans, True), (following or {}, False)):
        for idx, moe in moe_layers.items():
            experts, plan = moe.experts, pass_plans.get(idx)
            if (plan is None or plan.counts is None or not isinstance(experts, OffloadedExperts)
                    or not experts.cache.prefetch or experts.key is None):
                continue
            experts.prepare()
            needed = [e for e, n in enumerate(plan.counts) if n]
            if this_pass:
                plan.experts = needed
            keys += [(experts.key, e) for e in needed]
            cache = experts.cache
    if cache is not None:
        cache.plan(keys)
    return plans
