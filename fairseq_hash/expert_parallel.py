"""Expert parallelism: a hash layer's K experts spread over the ranks of a group.

    layout = expert_layout(parallel_size=2)      # on each of W ranks, W divisible by 2
    exchange = AllToAllExchange(layout)
    y = exchange(x, indices, weights, experts)   # experts hold this rank's K/P experts

The W ranks of fairseq's data-parallel world are cut into W/P *expert groups*
of P consecutive ranks. Rank ``j`` of a group holds the experts
``[j*K/P, (j+1)*K/P)``; the W/P groups are data-parallel replicas of each
other, and the ranks holding the same shard (one in each group) form its
*replica group*. Global expert ``e`` lives on rank ``e // (K/P)`` of every
expert group, in slot ``e % (K/P)``. By default P stays within the ranks of
one node (:func:`ranks_per_node`, ``HashLayerSpec.parallel_size_for``); P is
how a run is laid out, not part of the model, so a checkpoint loads under any
layout (:func:`install_checkpoint_reader`).

Tokens travel to their expert's rank and back through fairscale's MoE
all-to-all (``fairscale.nn.moe.moe_layer._AllToAll``), which splits its input
evenly: every rank sends ``P`` blocks of ``C`` rows, ``C`` the largest count
any rank sends any other in this step, learned from one all-gather of the
per-expert counts. Nothing is dropped and no one-hot ``[S, K, C]`` mask is
built: rows are placed by index. Hash layers know their counts from the token
ids before the layer runs, so the decoder gathers every hash layer's counts in
one collective per forward pass (:func:`gather_counts` on stacked counts).

Every rank must run these collectives in the same order: what would make
ranks take different paths (LayerDrop, ``--store-ema``, ``--eval-bleu``,
fairseq's recovery from out-of-memory errors) is refused or made to fail
(``HashLayerSpec.validate``, :func:`fail_on_out_of_memory`).

Gradients: an expert's gradient sums the contributions of every token routed
to it anywhere in the global batch. Within a group the all-to-all's backward
brings them to the expert's rank; across groups :func:`sync_expert_gradients`
all-reduces each expert shard over its replica group as autograd produces it
(so gradient accumulation over ``--update-freq`` stays exact) and divides by
W, matching fairseq's averaging of shared gradients, which it multiplies back
by W before dividing by the sample size.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from fairscale.nn.moe.moe_layer import _AllToAll

from .errors import HashConfigError
from .route import LayerPlan

logger = logging.getLogger(__name__)

# fairseq's --ddp-backend values that leave ``param.expert`` parameters to us:
# legacy_ddp skips them; PyTorch's DDP is told to ignore them (see below)
EXPERT_SAFE_BACKENDS = ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d")


@dataclass
class ExpertLayout:
    world_size: int  # W
    rank: int
    parallel_size: int  # P, ranks in an expert group
    group: Optional[object]  # this rank's expert group (None when P = 1)
    replica_group: Optional[object]  # ranks holding the same shard (None when W = P)

    @property
    def shard(self) -> int:
        """This rank's position in its expert group: it holds shard ``shard`` of P."""
        return self.rank % self.parallel_size


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else the GPUs fairseq's
    spawn starts one process on each, else (processes started by hand on CPU)
    the whole world."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return min(int(local), world_size)
    if torch.cuda.is_available():
        return min(torch.cuda.device_count(), world_size)
    return world_size


@functools.lru_cache(maxsize=None)
def _groups(world_size: int, parallel_size: int):
    """Every expert group and replica group, created in the same order on all ranks
    (``new_group`` is collective); cached so all hash layers share them."""
    logger.info(f"expert parallelism: {world_size // parallel_size} expert group(s) of "
                f"{parallel_size} consecutive rank(s) (--moe-expert-parallel-size "
                f"{parallel_size})")
    expert_groups = [dist.new_group(list(range(g, g + parallel_size)))
                     for g in range(0, world_size, parallel_size)]
    replica_groups = [dist.new_group(list(range(j, world_size, parallel_size)))
                      for j in range(parallel_size)]
    return expert_groups, replica_groups


def world_size() -> int:
    """Ranks of the data-parallel world (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def expert_layout(parallel_size: int) -> ExpertLayout:
    """This rank's layout with experts spread over groups of ``parallel_size`` ranks
    (``HashLayerSpec.parallel_size_for`` chooses and checks it)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    expert_groups, replica_groups = _groups(world, parallel_size)
    return ExpertLayout(
        world_size=world, rank=rank, parallel_size=parallel_size,
        group=expert_groups[rank // parallel_size] if parallel_size > 1 else None,
        replica_group=(replica_groups[rank % parallel_size]
                       if world > parallel_size else None),
    )


def _contiguous(obj):
    """Every tensor in nested dicts and lists made contiguous, in place."""
    if torch.is_tensor(obj):
        return obj.contiguous()
    if isinstance(obj, (dict, list)):
        for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            obj[key] = _contiguous(value)
    return obj


def _forget_saved_layout(state, overrides):
    """A checkpoint's --moe-expert-parallel-size is how the run that wrote it was
    laid out, not part of the model: the reading run picks its own, unless it
    names one in its overrides (``--model-overrides``, the hub's keywords)."""
    if "moe_expert_parallel_size" in (overrides or {}):
        return
    cfg = state.get("cfg")
    for model_cfg in (state.get("args"), cfg.get("model") if cfg is not None else None):
        saved = getattr(model_cfg, "moe_expert_parallel_size", 0) if model_cfg is not None else 0
        if saved:
            setattr(model_cfg, "moe_expert_parallel_size", 0)
            logger.info(f"the checkpoint was trained with --moe-expert-parallel-size {saved}; "
                        f"this run lays its experts out for its own ranks (to choose: "
                        f"--model-overrides \"{{'moe_expert_parallel_size': P}}\")")


def install_checkpoint_reader():
    """Wrap fairseq's checkpoint reader (once per process) for any number of ranks.

    - Tensors come back contiguous. On several ranks fairseq's
      ``Trainer.load_checkpoint`` reads the file on rank 0 and sends it to the
      others with ``distributed_utils.broadcast_tensors``, which sends a
      tensor's memory as it lies and has the receivers view it as a contiguous
      tensor of the same shape: a sliced tensor (the ``argsort(...)[:, :k]``
      table of a top-k random hash, saved so before routers stored their tables
      contiguous) arrived scrambled on every rank but 0, which then computed
      another model (``tests/test_ep_resume.py``).
    - The saved expert-parallel size is forgotten (:func:`_forget_saved_layout`):
      fairseq's tools rebuild a model from the checkpoint's flags, and a P of
      the writing run may be impossible for the reading one.
    """
    if getattr(checkpoint_utils.load_checkpoint_to_cpu, "_fairseq_hash", False):
        return
    load = checkpoint_utils.load_checkpoint_to_cpu

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, arg_overrides=None, *args, **kwargs):
        state = _contiguous(load(path, arg_overrides, *args, **kwargs))
        _forget_saved_layout(state, arg_overrides)
        return state

    load_checkpoint_to_cpu._fairseq_hash = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def fail_on_out_of_memory():
    """Make an out-of-memory error in a training or validation step end the run
    (once per process).

    fairseq's ``Trainer.train_step`` catches it, skips the micro-batch on that
    rank alone and goes on, and ``valid_step`` retries the batch on that rank
    alone, while the other ranks are in other collectives: a hang, or
    collectives paired with the wrong partner. Called with ``raise_oom=True``,
    both raise instead; we say why in one line.
    """
    from fairseq.trainer import Trainer

    for name in ("train_step", "valid_step"):
        step = getattr(Trainer, name)
        if not getattr(step, "_fairseq_hash", False):
            setattr(Trainer, name, _raising_out_of_memory(step, name))


def _raising_out_of_memory(step, name):
    @functools.wraps(step)
    def step_or_fail(self, sample, raise_oom=False):
        try:
            return step(self, sample, raise_oom=True)
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            what = "a training" if name == "train_step" else "a validation"
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise HashConfigError(
                f"rank {rank} ran out of device memory in {what} step; with "
                f"expert layers on several ranks fairseq cannot skip or retry a batch on one "
                f"rank alone: lower --max-tokens or --batch-size") from e

    step_or_fail._fairseq_hash = True
    return step_or_fail


def sync_expert_gradients(params: List[torch.nn.Parameter], layout: ExpertLayout):
    """Make each expert shard's gradient the global batch's sum, over W.

    A hook on the parameter sees the gradient of one backward before autograd
    accumulates it into ``.grad``; reducing there keeps accumulation over
    several backwards (``--update-freq``) exact. Every rank runs the same
    hooks in the same order, so the collectives match.
    """
    world, group = layout.world_size, layout.replica_group

    def hook(grad):
        grad = grad / world
        if group is not None:
            dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(hook)


def gather_counts(counts: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``[..., E]`` counts of this rank -> ``[P, ..., E]`` of every rank in the group."""
    out = [torch.empty_like(counts) for _ in range(layout.parallel_size)]
    dist.all_gather(out, counts.contiguous(), group=layout.group)
    return torch.stack(out)


def _segment_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(s, s + n)`` for every (start, length) pair."""
    total = int(lengths.sum())
    offsets = lengths.cumsum(0) - lengths
    return (torch.arange(total, device=starts.device)
            + torch.repeat_interleave(starts - offsets, lengths, output_size=total))


class AllToAllExchange:
    """Dropless dispatch of sorted tokens to their experts' ranks and back."""

    def __init__(self, layout: ExpertLayout):
        self.layout = layout

    def __call__(self, x, indices, weights, experts, plan: Optional[LayerPlan] = None):
        # x: [S, d]; indices: [S, k] global ids in [0, E), E = P * local experts;
        # a dropped slot carries id E and goes nowhere
        P, me, L = self.layout.parallel_size, self.layout.shard, experts.bins
        E = P * L
        S, k = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted by expert, so by rank
        counts = torch.bincount(flat, minlength=E + 1)[:E]
        all_counts = plan.counts if plan is not None else None  # planned by the model
        if all_counts is None:
            all_counts = gather_counts(counts, self.layout)  # [P, E] of every rank
        pair = all_counts.view(P, P, L).sum(-1)  # [src, dst] rows
        capacity = int(pair.max())
        send = pair[me]  # [P] rows this rank sends each rank
        kept = int(send.sum())
        # slot of each sorted row in the send buffer [P * C]: block of its rank
        dest = torch.repeat_interleave(torch.arange(P, device=x.device), send, output_size=kept)
        start = send.cumsum(0) - send
        slot = dest * capacity + torch.arange(kept, device=x.device) - start[dest]
        token_of = order[:kept] // k
        x_sorted = x.index_select(0, token_of)  # [kept, d]
        buffer = x.new_zeros(P * capacity, x.size(1)).index_copy(0, slot, x_sorted)
        received = _AllToAll.apply(self.layout.group, buffer)  # [P * C, d], block s from s
        # received rows in expert-major order: for each local expert, each source
        recv = all_counts[:, me * L:(me + 1) * L]  # [src, local expert]
        starts = (torch.arange(P, device=x.device) * capacity).unsqueeze(1) \
            + recv.cumsum(1) - recv
        rows = _segment_rows(starts.t().reshape(-1), recv.t().reshape(-1))  # [R]
        h = experts(received.index_select(0, rows), recv.sum(0).tolist())  # [R, d]
        back = h.new_zeros(P * capacity, h.size(1)).index_copy(0, rows, h)
        returned = _AllToAll.apply(self.layout.group, back)  # [P * C, d] in send layout
        h = returned.index_select(0, slot)  # [kept, d], this rank's sorted rows
        if weights is not None:
            h = h * weights.reshape(-1)[order[:kept]].unsqueeze(-1).to(h.dtype)
        return h.new_zeros(S, h.size(1)).index_add(0, token_of, h), S * k - kept
