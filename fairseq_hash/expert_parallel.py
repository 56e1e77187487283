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
layout (``distributed_checkpoints.install_checkpoint_loading``).

Tokens travel to their expert's rank and back through fairscale's MoE
all-to-all (``fairscale.nn.moe.moe_layer._AllToAll``), which splits its input
evenly: every rank sends ``P`` blocks of ``C`` rows, ``C`` the largest count
any rank sends any other in this step, learned from one all-gather of the
per-expert counts; or (``--moe-dispatch alltoall-exact``) through torch's
``all_to_all_single`` with exact split sizes, so no padding row travels.
Nothing is dropped and no one-hot ``[S, K, C]`` mask is built: rows are placed
by index. Hash layers know their counts from the token ids before the layer
runs, so the decoder gathers every hash layer's counts in one collective per
forward pass and reads them once (``moe_layer.plan_hash_dispatch``); the
exchange itself then reads nothing from the device.

Every rank must run these collectives in the same order: what would make
ranks take different paths (LayerDrop, ``--store-ema``, ``--eval-bleu``,
fairseq's recovery from out-of-memory errors) is refused or made to fail
(``HashLayerSpec.validate``, :func:`fail_on_out_of_memory`).

Gradients: an expert's gradient sums the contributions of every token routed
to it anywhere in the global batch. Within a group the all-to-all's backward
brings them to the expert's rank; across groups :class:`ExpertGradientSync`
all-reduces each expert shard over its replica group once per update, on the
last micro-batch of ``--update-freq``, without waiting, as autograd finishes
it, and divides by W, matching fairseq's averaging of shared gradients, which
it multiplies back by W before dividing by the sample size.
"""
import functools
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from fairscale.nn.moe.moe_layer import _AllToAll

from .errors import HashConfigError
from .grouped_mm import to_device
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


def _inside_no_sync(wrapper: Optional[torch.nn.Module]) -> bool:
    """Whether fairseq's data-parallel wrapper is in its ``no_sync`` context, which
    fairseq's trainer enters for every micro-batch of ``--update-freq`` but the last."""
    m = wrapper
    while isinstance(m, torch.nn.Module):
        if getattr(m, "accumulate_grads", False):  # LegacyDistributedDataParallel
            return True
        if getattr(m, "require_backward_grad_sync", True) is False:  # torch's DDP
            return True
        m = m._modules.get("module")  # ModuleProxyWrapper -> DDP -> the model
    return False


class ExpertGradientSync:
    """Once per update, make each expert gradient the global batch's sum over W,
    and let fairseq see a non-finite expert gradient of any rank.

        sync = ExpertGradientSync(layout)   # layout None on one process
        sync.register(experts.parameters()); sync.set_anchor(embed_tokens.weight)
        sync.begin()                        # at each forward (HashLayers.routing)

    Gradients accumulate locally over the micro-batches of an update. On the
    last one (fairseq's data-parallel wrapper is not in ``no_sync``; without a
    wrapper every backward is the last, or use :meth:`no_sync`), a hook on each
    expert parameter divides its accumulated ``.grad`` by W in place and starts
    its all-reduce over the replica group without waiting, as autograd finishes
    it, so the reduction overlaps the rest of the backward. Every rank runs the
    same hooks in the same order, so the collectives match.

    fairseq's gradient norm skips ``param.expert`` parameters, so an inf or NaN
    confined to expert gradients is never seen by the ``--fp16`` overflow
    check, and under ``--amp`` only the ranks holding it skip their step. When
    the last gradient has arrived, the expert gradients' float32 sum is
    all-reduced over the world, and ``sum - sum`` (0, or NaN where any expert
    gradient anywhere is not finite) is added to one element of the *anchor*,
    a shared parameter whose gradient autograd produces last (the input
    embedding): every rank's norm is then NaN and every rank skips the step.
    Nothing is read back to the host.
    """

    def __init__(self, layout: Optional[ExpertLayout]):
        self.layout = layout
        self.params: List[torch.nn.Parameter] = []
        self.anchor: Optional[torch.nn.Parameter] = None
        self.wrapper = None  # fairseq's data-parallel wrapper, once seen (follow_wrapper)
        self.accumulating = False  # this micro-batch is not its update's last
        self._manual_no_sync = False
        self._pending = []  # all-reduces in flight
        self._expected = self._arrived = 0

    def register(self, params):
        for p in params:
            self.params.append(p)
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def set_anchor(self, param: torch.nn.Parameter):
        self.anchor = param
        param.register_post_accumulate_grad_hook(self._anchor_ready)

    @contextmanager
    def no_sync(self):
        """Accumulate the backwards run inside locally (for callers without fairseq's wrapper)."""
        self._manual_no_sync = True
        try:
            yield
        finally:
            self._manual_no_sync = False

    def begin(self):
        """Called at each forward pass: which backward is coming, and how many hooks."""
        self._wait()  # a backward that never finished (none in fairseq) leaves nothing behind
        self.accumulating = self._manual_no_sync or _inside_no_sync(self.wrapper)
        self._expected = sum(p.requires_grad for p in self.params) + (
            self.anchor is not None and self.anchor.requires_grad)
        self._arrived = 0

    def _grad_ready(self, p):
        if self.accumulating:
            return
        if self.layout is not None:
            if self.layout.world_size > 1:
                p.grad.div_(self.layout.world_size)  # fairseq's averaging of shared gradients
            if self.layout.replica_group is not None:
                self._pending.append(dist.all_reduce(p.grad, group=self.layout.replica_group,
                                                     async_op=True))
        self._arrive()

    def _anchor_ready(self, p):
        if not self.accumulating:
            self._arrive()

    def _arrive(self):
        self._arrived += 1
        # without begin() (a layer used on its own) every gradient finishes at once
        if self._arrived >= self._expected:
            self._wait()
            if self.anchor is not None:
                self._carry_overflow()

    def _wait(self):
        for work in self._pending:
            work.wait()
        self._pending.clear()

    def _carry_overflow(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads or self.anchor.grad is None:
            return
        total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
        if self.layout is not None:
            dist.all_reduce(total)  # every rank, every shard
        self.anchor.grad.view(-1)[:1].add_((total - total).to(self.anchor.grad.dtype))

    def follow_wrapper(self, module: torch.nn.Module):
        """Find the data-parallel wrapper around ``module`` at the first forward pass.

        fairseq tells only its wrapper (``model.no_sync()``) which micro-batch
        of an update is the last, and a model never sees its wrapper: a global
        forward pre-hook waits for the outermost module that contains
        ``module`` to run, keeps it, and removes itself.
        """
        target = weakref.ref(module)

        def find(outer, args):
            if target() is None:
                handle.remove()
            elif any(m is target() for m in outer.modules()):
                self.wrapper = outer
                handle.remove()
                logger.info(f"expert gradients: reduced once per update, on the last "
                            f"micro-batch (seen by {type(outer).__name__})")

        handle = torch.nn.modules.module.register_module_forward_pre_hook(find)


def gather_counts(counts: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``[..., E]`` counts of this rank -> ``[P, ..., E]`` of every rank in the group."""
    out = [torch.empty_like(counts) for _ in range(layout.parallel_size)]
    dist.all_gather(out, counts.contiguous(), group=layout.group)
    return torch.stack(out)


def _segment_rows(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenated ``arange(s, s + n)`` for every (start, length) pair; ``total`` rows."""
    offsets = lengths.cumsum(0) - lengths
    return (torch.arange(total, device=starts.device)
            + torch.repeat_interleave(starts - offsets, lengths, output_size=total))


class ExchangeSizes:
    """Who sends whom how many rows, as Python ints, from every rank's counts.

    ``everyone[s][e]``: rows rank s of the expert group sends expert e. With L
    experts a rank, ``pair[s][r]`` rows go from rank s to rank r; fairscale's
    all-to-all pads every pair to the largest, ``capacity``.
    """

    def __init__(self, everyone: List[List[int]], me: int, local_experts: int):
        P, L = len(everyone), local_experts
        self.pair = [[sum(row[r * L:(r + 1) * L]) for r in range(P)] for row in everyone]
        self.capacity = max(max(row) for row in self.pair)
        self.send = self.pair[me]  # [P] rows this rank sends each rank
        self.kept = sum(self.send)
        self.receive = [row[me] for row in self.pair]  # [P] rows each rank sends this one
        # rows from each source for each local expert: [P][L]
        self.recv = [row[me * L:(me + 1) * L] for row in everyone]
        self.per_expert = [sum(col) for col in zip(*self.recv)]  # [L] rows of each local expert

    @property
    def rows_on_the_wire(self) -> int:
        """Rows this rank's padded buffer holds, each way (blocks for itself included)."""
        return len(self.pair) * self.capacity


class _AllToAllSplit(torch.autograd.Function):
    """torch's ``all_to_all_single`` with split sizes known on the host; its backward
    is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, group, x, output_splits: List[int], input_splits: List[int]):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        out = x.new_empty(sum(output_splits), x.size(1))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return None, _AllToAllSplit.apply(ctx.group, grad, input_splits, output_splits), None, None


class AllToAllExchange:
    """Dropless dispatch of sorted tokens to their experts' ranks and back.

    ``exact=False`` (``--moe-dispatch alltoall``): fairscale's all-to-all, every
    block padded to the step's largest. ``exact=True`` (``--moe-dispatch
    alltoall-exact``): torch's ``all_to_all_single`` with the planned split
    sizes, so only rows with a token travel.
    """

    def __init__(self, layout: ExpertLayout, exact: bool = False):
        self.layout = layout
        self.exact = exact
        self.last_sizes = None  # ExchangeSizes of the last forward (benchmarks read it)

    def sizes(self, flat: torch.Tensor, experts, plan: Optional[LayerPlan] = None) -> ExchangeSizes:
        """The exchange's sizes: a hash layer's from its plan, else one all-gather and one read."""
        P, L = self.layout.parallel_size, experts.bins
        if plan is not None:
            everyone = plan.everyone
        else:  # a learned router decides in the layer
            counts = torch.bincount(flat, minlength=P * L + 1)[:P * L]
            everyone = gather_counts(counts, self.layout).tolist()  # [P][E]
        return ExchangeSizes(everyone, self.layout.shard, L)

    def __call__(self, x, indices, weights, experts, plan: Optional[LayerPlan] = None):
        # x: [S, d]; indices: [S, k] global ids in [0, E), E = P * local experts;
        # a dropped slot (or a padding position's) carries id E and goes nowhere
        P, L = self.layout.parallel_size, experts.bins
        S, k = indices.shape
        device = x.device
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted by expert, so by rank
        sizes = self.last_sizes = self.sizes(flat, experts, plan)
        token_of = order[:sizes.kept] // k
        x_sorted = x.index_select(0, token_of)  # [kept, d], blocks by destination rank
        if self.exact:
            block_start = [sum(sizes.receive[:s]) for s in range(P)]
            received = _AllToAllSplit.apply(self.layout.group, x_sorted, sizes.receive, sizes.send)
        else:
            block_start = [s * sizes.capacity for s in range(P)]
            slot = self._padded_slots(sizes, device)
            buffer = x.new_zeros(P * sizes.capacity, x.size(1)).index_copy(0, slot, x_sorted)
            received = _AllToAll.apply(self.layout.group, buffer)  # [P * C, d], block s from s
        # received rows in expert-major order: for each local expert, each source
        starts = [block_start[s] + sum(sizes.recv[s][:e]) for e in range(L) for s in range(P)]
        lengths = [sizes.recv[s][e] for e in range(L) for s in range(P)]
        rows = _segment_rows(to_device(starts, device), to_device(lengths, device),
                             sum(lengths))  # [R]
        h = experts(received.index_select(0, rows), sizes.per_expert)  # [R, d]
        back = h.new_zeros(received.shape).index_copy(0, rows, h)
        if self.exact:
            h = _AllToAllSplit.apply(self.layout.group, back, sizes.send, sizes.receive)
        else:
            returned = _AllToAll.apply(self.layout.group, back)  # [P * C, d] in send layout
            h = returned.index_select(0, slot)  # [kept, d], this rank's sorted rows
        if weights is not None:
            h = h * weights.reshape(-1)[order[:sizes.kept]].unsqueeze(-1).to(h.dtype)
        return h.new_zeros(S, h.size(1)).index_add(0, token_of, h), S * k - sizes.kept

    @staticmethod
    def _padded_slots(sizes: ExchangeSizes, device) -> torch.Tensor:
        """``[kept]`` place of each sorted row in the padded send buffer ``[P * C]``."""
        send = to_device(sizes.send, device)
        P = len(sizes.send)
        dest = torch.repeat_interleave(torch.arange(P, device=device), send,
                                       output_size=sizes.kept)
        start = send.cumsum(0) - send
        return dest * sizes.capacity + torch.arange(sizes.kept, device=device) - start[dest]
