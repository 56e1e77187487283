"""Expert gradients reduced over their replica group once per update, on the
last micro-batch of ``--update-freq`` (:class:`ExpertGradientSync`)."""
import logging
import weakref
from contextlib import contextmanager
from typing import List, Optional

import torch
import torch.distributed as dist

from .layout import ExpertLayout

logger = logging.getLogger(__name__)

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
