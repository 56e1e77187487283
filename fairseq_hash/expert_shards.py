"""Sharded checkpoints: each rank's experts in a file of their own, read row by row.

A checkpoint of an expert-parallel run is a *set* of files in the save folder::

    checkpoint_last.pt                      fairseq's file: the shared weights, fairseq's
                                            state, and the index of the shards (written last)
    experts-e3-u120-1f2e3d4c-shard0of2.pt   the rows of every expert tensor rank 0 holds
    experts-e3-u120-1f2e3d4c-shard1of2.pt   and their optimizer state; rank 1's

A shard file holds ``{"model": {key: [L, ...]}, "optimizer": {key: {name: value}},
"rows": {key: [first, count, total]}, "tag": ...}``: the L experts
``[first, first + L)`` of each expert tensor of the model, and the per-parameter
optimizer state of that tensor (tensors of L rows, scalars such as Adam's step).
The index, under :data:`INDEX` in fairseq's file, names each shard with its
size in bytes, and for each expert key which rows each shard holds and which
entry of fairseq's optimizer state is that parameter's. Copies that fairseq
makes of its file (``checkpoint_best.pt``, ``checkpoint3.pt``) share the shards.

Shard names carry the epoch, the update and a random tag drawn at each save,
so a new set never overwrites a file that an older index names: a run that
stops between its shards and its index leaves the previous checkpoint whole.

Reading: a wrapper of fairseq's ``checkpoint_utils.load_checkpoint_to_cpu``
(``distributed_checkpoints.install_checkpoint_loading``) calls
:func:`resolve_shards`, which checks the shards named by the index and puts a
small *row reference* (a dict, see :func:`is_rows`) where each expert tensor
would be, and a mark where its optimizer state would be. An expert
module resolves its reference with :func:`read_rows` for the rows it holds,
from the shard files memory-mapped, and remembers it, so that the optimizer's
rows are read from the same files after fairseq loads the optimizer. No
process reads more than its own rows: one process holds all K, a rank of P
holds K/P, on any number of ranks.
"""
import os
import re
import secrets
from typing import Dict, List, Optional

import torch

from .errors import HashConfigError

INDEX = "fairseq_hash_expert_shards"  # the index, in fairseq's checkpoint file
ROWS = "fairseq_hash_expert_rows"  # marks a row reference
FORMAT = 1
SHARD_FILE = re.compile(r"^experts-e\d+-u\d+-[0-9a-f]+-shard\d+of\d+\.pt(\.tmp)?$")


def new_tag(epoch: int, updates: int) -> str:
    return f"e{epoch}-u{updates}-{secrets.token_hex(4)}"


def shard_name(tag: str, shard: int, shards: int) -> str:
    return f"experts-{tag}-shard{shard}of{shards}.pt"


def shard_contents(tag: str, shard: int, shards: int, model: Dict[str, torch.Tensor],
                   rows: Dict[str, List[int]], optimizer: Dict[str, dict]) -> dict:
    """What one shard file holds: ``rows[key] = [first, count, total]``."""
    return {"format": FORMAT, "tag": tag, "shard": shard, "shards": shards,
            "model": model, "rows": rows, "optimizer": optimizer}


def build_index(tag: str, written: List[dict], optimizer_index: Dict[str, int]) -> dict:
    """The index rank 0 writes, from every writer's ``{"shard", "file", "bytes", "rows"}``."""
    written = sorted(written, key=lambda w: w["shard"])
    model = {}
    for i, w in enumerate(written):
        for key, (first, count, total) in w["rows"].items():
            model.setdefault(key, {"total": total, "rows": []})["rows"].append([i, first, count])
    return {"format": FORMAT, "tag": tag,
            "shards": [{"file": w["file"], "bytes": w["bytes"]} for w in written],
            "model": model, "optimizer": optimizer_index}


def is_rows(value) -> bool:
    """Whether ``value`` is a row reference left by :func:`resolve_shards`."""
    return isinstance(value, dict) and ROWS in value


def num_rows(value) -> int:
    """Experts in a checkpoint's tensor or its row reference."""
    return value[ROWS]["total"] if is_rows(value) else value.size(0)


def _reference(index: dict, folder: str, key: str) -> dict:
    entry = index["model"][key]
    pieces = [[os.path.join(folder, index["shards"][i]["file"]), first, count]
              for i, first, count in entry["rows"]]
    return {ROWS: {"key": key, "part": "model", "tag": index["tag"], "total": entry["total"],
                   "pieces": pieces}}


def check_shards(index: dict, path: str):
    """Refuse, in one line naming the file, a set with a missing or mismatched shard."""
    if index.get("format") != FORMAT:
        raise HashConfigError(f"{path}: sharded checkpoint format {index.get('format')}; "
                              f"this fairseq-hash reads format {FORMAT}")
    folder = os.path.dirname(os.path.abspath(path))
    for shard in index["shards"]:
        file = os.path.join(folder, shard["file"])
        if not os.path.isfile(file):
            raise HashConfigError(
                f"{path}: its expert shard {file} is missing; a sharded checkpoint needs "
                f"all {len(index['shards'])} files its index names, in its folder")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
            raise HashConfigError(
                f"{path}: its expert shard {file} has {size} bytes where the index expects "
                f"{shard['bytes']}: the file is not the one this checkpoint wrote")


def resolve_shards(state: dict, path: str) -> dict:
    """In a loaded checkpoint with an index: a row reference for every expert
    tensor (``state["model"]``) and its optimizer state; other states unchanged."""
    index = state.get(INDEX) if isinstance(state, dict) else None
    if index is None:
        return state
    check_shards(index, path)
    folder = os.path.dirname(os.path.abspath(path))
    for key in index["model"]:
        state["model"][key] = _reference(index, folder, key)
    optimizer = state.get("last_optimizer_state")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict):
        for key, i in index["optimizer"].items():
            # torch's Optimizer.load_state_dict rebuilds every iterable in a
            # state (a str becomes the str of a generator): only a mark here;
            # the files are those the model's tensor was read from
            optimizer["state"][i] = {ROWS: FORMAT}
    return state


def optimizer_reference(model_ref: dict) -> dict:
    """The reference of a tensor's optimizer state, from the tensor's own."""
    return {ROWS: dict(model_ref[ROWS], part="optimizer")}


def _open_shard(file: str, tag: str) -> dict:
    # memory-mapped: only the pages of the rows taken are read, and they are
    # released with the mapping when the caller drops the result
    try:
        shard = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise HashConfigError(f"expert shard {file}: not readable ({e})") from None
    if not isinstance(shard, dict) or shard.get("tag") != tag:
        raise HashConfigError(
            f"expert shard {file}: written by another save (tag {shard.get('tag')!r}, "
            f"the index expects {tag!r})")
    return shard


def _rows_of(value, count: int, lo: int, hi: int, file: str, key: str):
    if torch.is_tensor(value) and value.dim() and value.size(0) == count:
        return value[lo:hi]
    if torch.is_tensor(value) and value.dim():
        raise HashConfigError(f"expert shard {file}: {key} has {value.size(0)} rows where the "
                              f"index expects {count}")
    return value  # a scalar, such as Adam's step: the same in every shard


def read_rows(ref: dict, first: int, count: int):
    """Rows ``[first, first + count)`` of the tensor (``"model"`` part) or the
    optimizer state (``"optimizer"`` part, a dict) that ``ref`` stands for.

    A model tensor from one shard is a view of the mapped file (copy it);
    anything else is a new tensor of ``count`` rows: one tensor in flight."""
    ref = ref[ROWS]
    if first < 0 or first + count > ref["total"]:
        raise HashConfigError(f"{ref['key']}: rows [{first}, {first + count}) asked of "
                              f"{ref['total']} experts")
    parts = []  # (piece of the model tensor, or a state dict of pieces)
    for file, start, held in ref["pieces"]:
        lo, hi = max(first, start), min(first + count, start + held)
        if lo >= hi:
            continue
        shard = _open_shard(file, ref["tag"])
        if list(shard["rows"].get(ref["key"], [])[:2]) != [start, held]:
            raise HashConfigError(
                f"expert shard {file}: holds rows {shard['rows'].get(ref['key'])} of "
                f"{ref['key']} where the index expects [{start}, {held}]: files swapped?")
        stored = shard[ref["part"]].get(ref["key"])
        if ref["part"] == "model":
            if stored is None:
                raise HashConfigError(f"expert shard {file}: no {ref['key']}")
            parts.append(_rows_of(stored, held, lo - start, hi - start, file, ref["key"]))
        else:
            parts.append({name: _rows_of(value, held, lo - start, hi - start, file, ref["key"])
                          for name, value in (stored or {}).items()})
    if ref["part"] == "model":
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if not parts or not parts[0]:
        return {}
    return {name: (torch.cat([p[name] for p in parts]) if torch.is_tensor(value) and value.dim()
                   else value.clone() if torch.is_tensor(value) else value)
            for name, value in parts[0].items()}


def read_whole(ref: dict):
    """Every row of ``ref``: the one-file checkpoint's tensor or optimizer state."""
    whole = read_rows(ref, 0, ref[ROWS]["total"])
    return whole.clone() if torch.is_tensor(whole) else whole


def consolidated(state: dict) -> dict:
    """``state`` (resolved) as one file holds it: every expert row in place."""
    state = dict(state)
    index = state.pop(INDEX, None)
    model = state["model"]
    optimizer = state.get("last_optimizer_state")
    if index and isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict):
        optimizer = state["last_optimizer_state"] = dict(optimizer, state=dict(optimizer["state"]))
        for key, i in index["optimizer"].items():
            optimizer["state"][i] = read_whole(optimizer_reference(model[key]))
    state["model"] = {k: read_whole(v) if is_rows(v) else v for k, v in model.items()}
    return state


def shards_named_by(path: str) -> Optional[set]:
    """The shard files that the checkpoint ``path`` needs; None if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # a foreign or broken file: its shards are unknown
        return None
    index = state.get(INDEX) if isinstance(state, dict) else None
    return {s["file"] for s in index["shards"]} if index else set()
