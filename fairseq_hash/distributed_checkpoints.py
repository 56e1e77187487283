"""Checkpoints of expert-parallel models: each rank saves and loads its own experts.

fairseq writes a checkpoint from rank 0 alone and calls ``state_dict()``
there only, so under expert parallelism it would save rank 0's share of the
experts. Two small wrappers around fairseq's ``checkpoint_utils`` (installed by
:func:`prepare_expert_parallel` when a model has experts on several ranks)
write a *sharded* checkpoint instead (format: :mod:`fairseq_hash.expert_shards`):

- ``save_checkpoint`` runs on every rank. Rank j of rank 0's expert group
  writes its experts' rows and their optimizer state to a shard file of its
  own (the other groups hold replicas of the same rows and write nothing);
  after all shards are on disk, rank 0 runs fairseq's save, whose file now
  holds the shared weights and the index of the shards, and then removes the
  shards that no checkpoint in the folder names any more. Every file goes
  through fairseq's atomic write (a temporary file renamed over the old one).
  No rank gathers anything: each writes the tensors it holds, one at a time
  (``torch.save`` copies one storage at a time off a GPU).
- ``load_checkpoint``: fairseq loads its file (rank 0 reads it and broadcasts
  it); the index becomes row references (:func:`expert_shards.resolve_shards`),
  each expert module reads its own rows of the model's tensors from the
  memory-mapped shards (``ExpertFFN._load_from_state_dict``) and this wrapper
  reads the same rows of their optimizer state.

One-file checkpoints (written by one process, or by ``fairseq-hash-consolidate``)
still load everywhere: each rank keeps its rows of the whole ``[K, ...]`` stacks.
One process reads a sharded checkpoint with no step in between
(``fairseq-eval-lm``, ``fairseq-generate``, the hub interface, ...).
"""
import contextlib
import functools
import logging
import os
import zipfile

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils

from . import expert_shards
from .errors import HashConfigError, unreadable_checkpoint
from .experts import ExpertFFN
from .offload import loading as offload_loading

logger = logging.getLogger(__name__)


def sharded_experts(model):
    """``(ExpertFFN, layout)`` of every MoE layer whose experts are spread over ranks."""
    for module in model.modules():
        layout = getattr(getattr(module, "exchange", None), "layout", None)
        if layout is not None and isinstance(getattr(module, "experts", None), ExpertFFN):
            yield module.experts, layout


def expert_parameters(model, spread_only=True):
    """``(state-dict key, parameter, ExpertFFN, layout)`` of every expert tensor
    spread over ranks (or of every expert tensor, layout None on one process)."""
    layouts = {id(experts): layout for experts, layout in sharded_experts(model)}
    for prefix, experts in model.named_modules():
        if isinstance(experts, ExpertFFN) and (id(experts) in layouts or not spread_only):
            for name, p in experts.named_parameters(recurse=False):
                yield f"{prefix}.{name}", p, experts, layouts.get(id(experts))


def prepare_expert_parallel(model):
    """After building a model: tell PyTorch's DDP to leave experts to us, and
    install the checkpoint wrappers, where experts are spread over ranks."""
    expert_names = [name for name, p in model.named_parameters() if getattr(p, "expert", False)]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    # PyTorch's DDP would average them over all ranks, and broadcast rank 0's
    # experts over the others' at the start; their gradients are synced by
    # expert_parallel.gradient_sync.ExpertGradientSync
    model._ddp_params_and_buffers_to_ignore = expert_names
    if any(True for _ in sharded_experts(model)):
        install_checkpoint_wrappers()


def optimizer_state(trainer):
    """``(state, keyed_by, indices)`` of the torch optimizer inside fairseq's.

    ``keyed_by(p)`` is the tensor the state of model parameter ``p`` is kept
    under: ``p``, or under ``--fp16``/``--bf16`` the fp32 copy that fairseq's
    ``FP16Optimizer`` steps (it lists both in the same order). ``indices``
    numbers those tensors as ``Optimizer.state_dict()`` does."""
    optimizer, copies = trainer.optimizer, {}
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        if isinstance(getattr(optimizer, "fp32_params", None), list):
            copies.update(zip(map(id, optimizer.fp16_params), optimizer.fp32_params))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(
            optimizer, "fp32_optimizer", None)
    if optimizer is None:
        return {}, lambda p: p, {}
    indices, start = {}, 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"], start):
            indices.setdefault(id(p), i)
        start += len(group["params"])
    return optimizer.state, lambda p: copies.get(id(p), p), indices


def write_expert_shards(save_dir, trainer, epoch, with_optimizer=True):
    """Every rank: the writers of rank 0's expert group save their rows; returns
    the index on rank 0 (None elsewhere). Collective over the world."""
    tag = [expert_shards.new_tag(epoch, trainer.get_num_updates())]
    dist.broadcast_object_list(tag, src=0)  # one name for the whole set
    tag, rank = tag[0], dist.get_rank()
    params = list(expert_parameters(trainer.get_model()))
    shards = max(layout.parallel_size for *_, layout in params)
    state, keyed_by, indices = optimizer_state(trainer)
    if not with_optimizer:
        state, indices = {}, {}
    mine = [(key, p, experts) for key, p, experts, layout in params
            if layout.rank < layout.parallel_size]  # rank 0's expert group
    written = None
    if mine:
        name = expert_shards.shard_name(tag, rank, shards)
        contents = expert_shards.shard_contents(
            tag, rank, shards,
            model={key: p.detach() for key, p, _ in mine},
            rows={key: [e.first_expert, p.size(0), e.total_experts] for key, p, e in mine},
            optimizer={key: dict(state[keyed_by(p)]) for key, p, _ in mine
                       if state.get(keyed_by(p))})
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, name)
        checkpoint_utils.torch_persistent_save(contents, path)
        del contents
        written = {"shard": rank, "file": name, "bytes": os.path.getsize(path),
                   "rows": {key: [e.first_expert, p.size(0), e.total_experts]
                            for key, p, e in mine}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, written)  # also: every shard is written
    if rank:
        return None
    optimizer_index = {key: indices[id(keyed_by(p))] for key, p, *_ in params
                       if id(keyed_by(p)) in indices}
    return expert_shards.build_index(tag, [w for w in everyone if w], optimizer_index)


@contextlib.contextmanager
def experts_left_out(trainer, index, keys):
    """fairseq's ``trainer.state_dict()`` without the expert rows, with the index."""
    full = trainer.state_dict

    def state_dict():
        state = full()
        for key in keys:
            del state["model"][key]  # this rank's rows: in its shard
        optimizer = state.get("last_optimizer_state")
        if isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict):
            for i in index["optimizer"].values():
                optimizer["state"].pop(i, None)
        state[expert_shards.INDEX] = index
        return state

    trainer.state_dict = state_dict
    try:
        yield
    finally:
        del trainer.state_dict  # fairseq's method again


def remove_unnamed_shards(save_dir):
    """Rank 0, after a save: delete shard files that no checkpoint in the folder names."""
    names = os.listdir(save_dir)
    named = set()
    for name in names:
        if name.startswith("checkpoint") and name.endswith(".pt"):
            needs = expert_shards.shards_named_by(os.path.join(save_dir, name))
            if needs is None:
                logger.warning(f"{name}: could not read its index; old expert shards kept")
                return
            named |= needs
    for name in names:
        if expert_shards.SHARD_FILE.match(name) and name not in named:
            os.remove(os.path.join(save_dir, name))


def keep_own_optimizer_rows(trainer):
    """After fairseq loaded a checkpoint: this rank's rows of expert optimizer
    state, read from the shards (sharded) or cut from whole ``[K, ...]`` stacks."""
    params = list(expert_parameters(trainer.get_model(), spread_only=False))
    if not params:
        return
    state, keyed_by, _ = optimizer_state(trainer)
    for key, p, experts, _ in params:
        q = keyed_by(p)
        first, held = experts.first_expert, p.size(0)
        if expert_shards.is_rows(state.get(q)):
            source = experts.rows_source[key.rsplit(".", 1)[1]]
            rows = expert_shards.read_rows(expert_shards.optimizer_reference(source), first, held)
            if rows:
                state[q] = {k: v.to(q.device) if torch.is_tensor(v) else v
                            for k, v in rows.items()}
            else:
                del state[q]
            continue
        for key, value in list(state.get(q, {}).items()):
            if (torch.is_tensor(value) and value.dim() and value.shape != q.shape
                    and value.size(0) == experts.total_experts):
                state[q][key] = value[first:first + held].clone()


def install_checkpoint_wrappers():
    """Sharded saving, where a model's experts are spread over ranks."""
    if getattr(checkpoint_utils.save_checkpoint, "_fairseq_hash", False):
        return
    save = checkpoint_utils.save_checkpoint

    # fairseq keeps the best loss as an attribute of save_checkpoint, looked up
    # by that name: the wrapper carries it from now on
    @functools.wraps(save)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        if cfg.no_save:
            return save(cfg, trainer, epoch_itr, val_loss)
        index = write_expert_shards(cfg.save_dir, trainer, epoch_itr.epoch,
                                    with_optimizer=not cfg.no_save_optimizer_state)
        if index is None:  # not rank 0: fairseq writes nothing here
            return save(cfg, trainer, epoch_itr, val_loss)
        with experts_left_out(trainer, index, index["model"]):
            result = save(cfg, trainer, epoch_itr, val_loss)
        # an asynchronous write may not have renamed the new index yet
        if not cfg.write_checkpoints_asynchronously:
            remove_unnamed_shards(cfg.save_dir)
        return result

    save_checkpoint._fairseq_hash = True
    checkpoint_utils.save_checkpoint = save_checkpoint


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


def _raised_by_torch_load(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py")):
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def read_errors(path: str):
    """Around fairseq's read of checkpoint ``path``: a file torch cannot read
    because it is no whole zip archive (cut off by a copy or a killed save, or
    no checkpoint at all) is refused in one line; torch's own error is a
    traceback of some 60 lines that ends in miniz's, EOFError or a pickle error.
    Any other error keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if not _raised_by_torch_load(exc) or (os.path.isfile(path) and zipfile.is_zipfile(path)):
            raise
        raise unreadable_checkpoint(path, exc) from None


def install_checkpoint_loading():
    """Sharded and one-file checkpoints, on any number of ranks: installed with
    the plugin, before fairseq loads anything. ``load_checkpoint_to_cpu`` (every
    fairseq tool and the hub interface read through it) turns an index into row
    references; ``load_checkpoint`` (training resumes) keeps this rank's rows of
    the experts' optimizer state.

    Read on any number of ranks, a checkpoint's tensors come back contiguous:
    fairseq's ``Trainer.load_checkpoint`` reads the file on rank 0 and sends it
    to the others with ``distributed_utils.broadcast_tensors``, which sends a
    tensor's memory as it lies and has the receivers view it as a contiguous
    tensor of the same shape; a sliced tensor (the ``argsort(...)[:, :k]``
    table of a top-k random hash, saved so before routers stored their tables
    contiguous) arrived scrambled on every rank but 0, which then computed
    another model (``tests/test_ep_resume.py``). And the saved expert-parallel
    size is forgotten (:func:`_forget_saved_layout`): fairseq's tools rebuild a
    model from the checkpoint's flags, and a P of the writing run may be
    impossible for the reading one. With ``hash_offload_experts`` among the
    overrides, fairseq's read maps the file (:func:`offload.loading.mapped_read`),
    and the experts of the state, shards resolved, stay mapped from their files
    (:func:`offload.loading.map_if_asked`). A file torch cannot read is
    refused in one line (:func:`read_errors`), and ``load_model_ensemble_and_task``
    names the file of an ensemble that a refusal is about.
    """
    if getattr(checkpoint_utils.load_checkpoint, "_fairseq_hash", False):
        return
    to_cpu, load = checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.load_checkpoint
    ensemble = checkpoint_utils.load_model_ensemble_and_task
    reading = []  # the file load_checkpoint_to_cpu read last

    @functools.wraps(to_cpu)
    def load_checkpoint_to_cpu(path, arg_overrides=None, *args, **kwargs):
        reading[:] = [path]
        offload_loading.check_asked_mode(arg_overrides)
        with read_errors(path), offload_loading.mapped_read(arg_overrides):
            state = to_cpu(path, arg_overrides, *args, **kwargs)
        state = _contiguous(state)
        _forget_saved_layout(state, arg_overrides)
        state = expert_shards.resolve_shards(state, path)
        return offload_loading.map_if_asked(state, path, arg_overrides)

    @functools.wraps(load)
    def load_checkpoint(cfg, trainer, **kwargs):
        result = load(cfg, trainer, **kwargs)
        keep_own_optimizer_rows(trainer)
        return result

    @functools.wraps(ensemble)
    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        # fairseq reads the files one after the other and builds each model
        # after reading it: a refusal while building or loading is about the
        # file read last, which an ensemble's user must be told
        try:
            return ensemble(filenames, *args, **kwargs)
        except HashConfigError as exc:
            if not reading or reading[0] in str(exc):
                raise
            raise HashConfigError(f"{reading[0]}: {exc}") from None

    load_checkpoint._fairseq_hash = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_checkpoint = load_checkpoint
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task
