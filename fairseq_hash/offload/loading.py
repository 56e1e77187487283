"""Loading a checkpoint for offload: its experts memory-mapped from the file.

fairseq's tools and the hub interface read checkpoints through
``checkpoint_utils.load_checkpoint_to_cpu``; the plugin's one wrapper of it
(``distributed_checkpoints.install_checkpoint_loading``) checks the mode with
:func:`check_asked_mode`, reads the file and hands the state, shards resolved, to
:func:`map_if_asked`. Both are inert unless the overrides ask for
``hash_offload_experts``.

fairseq reads the checkpoint with ``torch.load`` on a file it opens, which torch
cannot map (``mmap=True`` needs a path). With offload asked for,
:func:`mapped_read` has that read map the file instead, so that loading a
checkpoint larger than memory holds no more than its shared weights.
"""
import contextlib

import torch

from .flags import OFFLOAD_FIELDS, check_offload_mode
from .mapped import backing_file, file_mappings
from .store import EXPERT_PARAMS


def asked_mode(overrides) -> str:
    """The ``hash_offload_experts`` the overrides ask for (``"none"`` if none)."""
    return (overrides or {}).get("hash_offload_experts", "none") or "none"


def check_asked_mode(overrides):
    """With offload asked for, its mode is checked before the file is read."""
    mode = asked_mode(overrides)
    if mode != "none":
        check_offload_mode(mode)


@contextlib.contextmanager
def mapped_read(overrides):
    """Around fairseq's ``load_checkpoint_to_cpu``: with offload asked for, its
    ``with open(local_path, "rb") as f: torch.load(f, ...)`` gets the path itself
    (``checkpoint_utils.open``, a module global in front of the builtin, for the
    call only) and torch loads by mapping the file (``torch.utils.serialization.
    config.load.mmap``, torch's documented default of ``torch.load``'s ``mmap``):
    every tensor of the state is then a view of the mapped file, read when used."""
    if asked_mode(overrides) == "none":
        yield
        return
    from fairseq import checkpoint_utils
    from torch.utils.serialization import config

    def open_path(file, mode="r", *args, **kwargs):
        if mode == "rb" and not args and not kwargs:
            return contextlib.nullcontext(file)
        return open(file, mode, *args, **kwargs)

    was_mmap, had_open = config.load.mmap, "open" in vars(checkpoint_utils)
    config.load.mmap, checkpoint_utils.open = True, open_path
    try:
        yield
    finally:
        config.load.mmap = was_mmap
        if not had_open:
            del checkpoint_utils.open


def map_if_asked(state: dict, path: str, overrides) -> dict:
    """With offload asked for: the overrides given to a checkpoint saved before
    they existed, and the experts of ``state`` mapped from ``path``. Returns
    ``state``."""
    if asked_mode(overrides) == "none":
        return state
    _give_overrides(state, overrides)
    if "model" in state:
        from fairseq.file_io import PathManager

        map_expert_tensors(state["model"], PathManager.get_local_path(path))
    return state


def map_expert_tensors(model_state: dict, path: str) -> int:
    """Replace the expert stacks of a loaded state dict by views of ``path`` mapped
    into memory (``torch.load(mmap=True)``), so that no expert stays in memory.

    Stacks already mapped from a file (a loader that maps its shards) are kept.
    Returns the number replaced.
    """
    keys = [k for k, v in model_state.items()
            if k.rsplit(".", 1)[-1] in EXPERT_PARAMS and ".experts." in k and torch.is_tensor(v)]
    mappings = file_mappings()
    keys = [k for k in keys if backing_file(model_state[k], mappings) is None]
    if not keys:
        return 0
    mapped = torch.load(path, map_location="cpu", mmap=True)["model"]
    replaced = 0
    for key in keys:
        value = mapped.get(key)
        if value is not None and value.shape == model_state[key].shape \
                and value.dtype == model_state[key].dtype:
            model_state[key] = value
            replaced += 1
    return replaced


def _give_overrides(state: dict, overrides: dict):
    """fairseq overwrites only the keys a checkpoint's saved config has; one saved
    before these flags existed lacks them: add them."""
    from omegaconf import OmegaConf, open_dict

    model_cfg = (state.get("cfg") or {}).get("model")
    if not OmegaConf.is_config(model_cfg):
        return  # an argparse model's Namespace (or "args"): fairseq sets every override
    with open_dict(model_cfg):
        for name in OFFLOAD_FIELDS:
            if name in overrides and name not in model_cfg:
                model_cfg[name] = overrides[name]
