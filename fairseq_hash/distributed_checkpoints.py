"""Checkpoints of expert-parallel models: one file with every expert, on any number of ranks.

fairseq writes a checkpoint from rank 0 alone and calls ``state_dict()``
there only, so under expert parallelism it would save rank 0's share of the
experts. Two small wrappers around fairseq's ``checkpoint_utils`` (installed by
:func:`prepare_expert_parallel` when a model has experts on several ranks)
keep the file whole:

- ``save_checkpoint`` runs on every rank: first the ranks of rank 0's expert
  group all-gather every expert shard and its optimizer state (Adam's moments,
  whatever has the parameter's shape), and rank 0 writes the file with the
  whole ``[K, ...]`` stacks in place of its own rows; then its rows come back.
  Only rank 0 writes, through fairseq's own atomic write (a temporary file
  renamed over the old one).
- ``load_checkpoint``: fairseq loads the whole file (rank 0 reads it and
  broadcasts it); each expert module keeps its own rows of the model's stacks
  (``ExpertFFN._load_from_state_dict``) and this wrapper keeps the same rows of
  their optimizer state.

The file is the one a single process writes, so ``fairseq-eval-lm``,
``fairseq-generate``, the hub interface and a resumed run on any number of
ranks read it with no step in between.
"""
import contextlib
import functools
import logging

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils

from .experts import ExpertFFN

logger = logging.getLogger(__name__)


def sharded_experts(model):
    """``(ExpertFFN, layout)`` of every MoE layer whose experts are spread over ranks."""
    for module in model.modules():
        layout = getattr(getattr(module, "exchange", None), "layout", None)
        if layout is not None and isinstance(getattr(module, "experts", None), ExpertFFN):
            yield module.experts, layout


def prepare_expert_parallel(model):
    """After building a model: tell PyTorch's DDP to leave experts to us, and
    install the checkpoint wrappers, where experts are spread over ranks."""
    expert_names = [name for name, p in model.named_parameters() if getattr(p, "expert", False)]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    # PyTorch's DDP would average them over all ranks, and broadcast rank 0's
    # experts over the others' at the start; their gradients are synced by
    # expert_parallel.sync_expert_gradients
    model._ddp_params_and_buffers_to_ignore = expert_names
    if any(True for _ in sharded_experts(model)):
        install_checkpoint_wrappers()


def _torch_optimizer(trainer):
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _gather_rows(tensor, group, size):
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


@contextlib.contextmanager
def whole_experts_on_rank0(trainer):
    """On rank 0, every expert's weights and optimizer state for the duration."""
    shards = list(sharded_experts(trainer.get_model()))
    if not shards or shards[0][1].rank >= shards[0][1].parallel_size:
        yield  # not in rank 0's expert group: nothing to send
        return
    state = getattr(_torch_optimizer(trainer), "state", {})
    swapped = []  # (owner, key or None, own tensor)
    for experts, layout in shards:
        for p in experts.parameters():
            whole = _gather_rows(p.data, layout.group, layout.parallel_size)
            moments = {key: _gather_rows(value, layout.group, layout.parallel_size)
                       for key, value in state.get(p, {}).items()
                       if torch.is_tensor(value) and value.shape == p.shape}
            if layout.rank == 0:
                swapped.append((p, None, p.data))
                p.data = whole
                for key, value in moments.items():
                    swapped.append((state[p], key, state[p][key]))
                    state[p][key] = value
    try:
        yield
    finally:
        for owner, key, own in swapped:
            if key is None:
                owner.data = own
            else:
                owner[key] = own


def keep_own_optimizer_rows(trainer):
    """After fairseq loaded a whole checkpoint: this rank's rows of expert moments."""
    state = getattr(_torch_optimizer(trainer), "state", {})
    for experts, _ in sharded_experts(trainer.get_model()):
        first, held = experts.first_expert, experts.fc1_weight.size(0)
        for p in experts.parameters():
            for key, value in list(state.get(p, {}).items()):
                if (torch.is_tensor(value) and value.dim() and value.shape != p.shape
                        and value.size(0) == experts.total_experts):
                    state[p][key] = value[first:first + held].clone()


def install_checkpoint_wrappers():
    if getattr(checkpoint_utils.save_checkpoint, "_fairseq_hash", False):
        return
    save, load = checkpoint_utils.save_checkpoint, checkpoint_utils.load_checkpoint

    # fairseq keeps the best loss as an attribute of save_checkpoint, looked up
    # by that name: the wrapper carries it from now on
    @functools.wraps(save)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        if cfg.no_save:
            return save(cfg, trainer, epoch_itr, val_loss)
        with whole_experts_on_rank0(trainer):
            return save(cfg, trainer, epoch_itr, val_loss)

    @functools.wraps(load)
    def load_checkpoint(cfg, trainer, **kwargs):
        result = load(cfg, trainer, **kwargs)
        keep_own_optimizer_rows(trainer)
        return result

    save_checkpoint._fairseq_hash = True
    checkpoint_utils.save_checkpoint = save_checkpoint
    checkpoint_utils.load_checkpoint = load_checkpoint
