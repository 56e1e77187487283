"""Experts kept out of memory at inference, loaded when, or before, a batch needs them.

    fairseq-eval-lm data-bin --path checkpoint.pt --user-dir $(fairseq-hash-user-dir) \
        --model-overrides "{'hash_offload_experts': 'prefetch', 'hash_expert_cache': '256MB'}"

A hash layer knows from the token ids alone which of its experts a batch will
use, before the forward pass (and before each step of incremental decoding).
With ``--hash-offload-experts prefetch`` the decoder (or encoder) hands that set
of every hash layer, in the order the layers will use them, to a loader thread
when its forward pass starts; the loader copies them into a bounded cache while
the layers before them compute. Learned routers (``switch``, ``top2``,
``base``) choose after their router has run, so their experts are loaded on
demand, as are a hash model's with ``--hash-offload-experts demand``.

Three pieces, in the order data flows:

- :class:`ExpertSource`: one layer's K experts as ``[K, ...]`` tensors,
  memory-mapped from the checkpoint file (:func:`map_expert_tensors`, run by
  the wrapper of fairseq's ``load_checkpoint_to_cpu``), or whatever tensors a
  checkpoint loader handed over (one file or shards alike). Reading expert e
  copies its four rows and gives the mapped pages back, so that the process
  keeps only what the cache holds.
- :class:`ExpertCache`: the loaded experts of all offloaded layers of one
  encoder or decoder, at most ``--hash-expert-cache`` of them (a count or MB).
  Knowing the exact order of use of the coming forward, it evicts the expert
  used furthest in the future (Belady's rule), experts no longer planned
  first, least recently used first among those.
- :class:`OffloadedExperts`: takes the place of ``ExpertFFN`` in a MoE layer;
  no parameters. Its forward fetches the experts that received rows (in turns
  when they do not fit in the cache together) and computes each expert's rows
  with the same products, in the same groups, as ``ExpertFFN`` on CPU.

On CUDA the sources are pinned in host memory on first use and the loader
copies the needed experts on a side stream; the forward waits on that copy's
event. (Written without a GPU at hand: untested on one.)
"""
import collections
import ctypes
import functools
import logging
import mmap
import os
import re
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import HashConfigError
from .expert_shards import ROWS, is_rows, read_rows
from .expert_threads import for_expert_groups
from .grouped_mm import ExpertRows
from .experts import dropout_inactive, fused_activation

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "prefetch", "demand")
# ExpertFFN's parameters, in the order an expert's rows are read
EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# the model fields the serving tools pass through --model-overrides
OFFLOAD_FIELDS = ("hash_offload_experts", "hash_expert_cache")

_CACHES = weakref.WeakSet()  # every cache of the process, for offload_stats()


def check_offload_mode(mode: str):
    if mode not in OFFLOAD_MODES:
        raise HashConfigError(f"--hash-offload-experts {mode!r} is unknown; valid: "
                              f"{', '.join(OFFLOAD_MODES)}")


def parse_cache_size(value) -> Tuple[str, float]:
    """``--hash-expert-cache``: ``("experts", n)`` for ``"16"``, ``("bytes", n)`` for ``"256MB"``.

    ``"0"`` (the default) is one layer's experts: every expert of the layer.
    """
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]B)?", text, flags=re.IGNORECASE)
    if match is None or (match.group(2) is None and "." in match.group(1)):
        raise HashConfigError(f"--hash-expert-cache {value!r}: give a number of experts (e.g. 16; "
                              f"0: one layer's experts) or a size in KB, MB or GB (e.g. 256MB)")
    number, unit = match.groups()
    if unit is None:
        return "experts", int(number)
    return "bytes", float(number) * 1024 ** ("KMG".index(unit[0].upper()) + 1)


# --- where the experts' weights are read from --------------------------------------------

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux and macOS
_LIBC = None


def _madvise():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _file_mappings() -> List[Tuple[int, int, int, str]]:
    """``(start, end, file offset, path)`` of the process's file mappings (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            out.append((start, end, int(fields[2], 16), fields[5]))
    return out


def file_position(tensor: torch.Tensor, mappings=None) -> Tuple[Optional[str], int]:
    """``(path, offset)`` of the file ``tensor``'s memory is mapped from, or ``(None, 0)``."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return None, 0
    address = tensor.data_ptr()
    for start, end, offset, path in mappings if mappings is not None else _file_mappings():
        if start <= address < end:
            return path, address - start + offset
    return None, 0


def backing_file(tensor: torch.Tensor, mappings=None) -> Optional[str]:
    """The file ``tensor``'s memory is mapped from, or None (ordinary memory)."""
    return file_position(tensor, mappings)[0]


def release_pages(tensor: torch.Tensor):
    """Drop this process's mapped pages of a file-mapped, never-written ``tensor``.

    The file's pages stay in the kernel's page cache; the process's resident
    set no longer counts them, and a later read maps them again from the file.
    Only for memory mapped from a file: on ordinary memory it would lose data.
    """
    madvise = _madvise()
    if not madvise:
        return
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _drop_page_cache(path: str, offset: int = 0, length: int = 0):
    """Evict a file's pages (all of it for length 0) from the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class ExpertSource:
    """One layer's K experts as four ``[K, ...]`` tensors: ``fc1_weight [K, f, d]``,
    ``fc1_bias [K, f]``, ``fc2_weight [K, d, f]``, ``fc2_bias [K, d]``.

    A stack may come in pieces: the rows of a sharded checkpoint's shard files
    (``expert_shards``), each mapped from its file.

    Args:
        tensors (dict): name -> ``[K, ...]`` tensor (mapped or in memory), or a list
            of ``(first row, [rows, ...] tensor)`` pieces covering the K experts
        name (str): names the layer in errors
    """

    # benchmarks: also drop the file's pages from the kernel's page cache after
    # each read, so that every read comes from the disk (a file larger than memory)
    uncached = False

    def __init__(self, tensors: Dict[str, object], name: str):
        self.pieces = [v if isinstance(v, list) else [(0, v)]
                       for v in (tensors[n] for n in EXPERT_PARAMS)]
        self.name = name
        self.num_experts = sum(t.size(0) for _, t in self.pieces[0])
        mappings = _file_mappings()
        # per parameter, per piece: (first row, tensor, file, offset of its first row)
        self.pieces = [[(first, t, *file_position(t, mappings)) for first, t in pieces]
                       for pieces in self.pieces]
        self.files = sorted({f for pieces in self.pieces for _, _, f, _ in pieces if f})
        # the mapped length of each file: reading past a truncated file's end
        # would kill the process (SIGBUS), so a shorter file is refused first
        self.file_sizes = {f: os.path.getsize(f) for f in self.files}
        self.pinned = None  # on CUDA: the pieces in pinned host memory
        self.pinning = threading.Lock()

    def row_bytes(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of one expert, in ``dtype`` (default: as stored)."""
        return sum(p[0][1][0].numel() * (dtype or p[0][1].dtype).itemsize for p in self.pieces)

    def check_files(self):
        for path, size in self.file_sizes.items():
            try:
                now = os.path.getsize(path)
            except OSError:
                now = None  # unlinked while mapped: the mapping still reads the old file
            if now is not None and now < size:
                raise HashConfigError(
                    f"expert file {path} is truncated: {now} bytes, {size} when the checkpoint "
                    f"was loaded ({self.name}); restore the checkpoint and load it again")

    def _rows(self, expert: int):
        """Per parameter: (its row of ``expert``, the file it is mapped from, the row's offset)."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"{self.name}: expert {expert} of {self.num_experts}")
        for pieces in self.pieces:
            first, t, path, offset = next(p for p in pieces if p[0] <= expert < p[0] + p[1].size(0))
            row = t[expert - first]
            yield row, path, offset + (expert - first) * row.numel() * row.element_size()

    def read(self, expert: int, dtype: torch.dtype, device: torch.device, stream=None):
        """Expert ``expert``'s four rows as new tensors of ``dtype`` on ``device``."""
        if device.type == "cuda":
            return self._read_cuda(expert, dtype, device, stream)
        self.check_files()
        out = []
        for row, path, offset in self._rows(expert):
            out.append(torch.empty(row.shape, dtype=dtype).copy_(row))
            if path:
                release_pages(row)
                if self.uncached:
                    _drop_page_cache(path, offset, row.numel() * row.element_size())
        return out

    def _read_cuda(self, expert, dtype, device, stream):
        # untested without a GPU: the rows pinned in host memory once, then one
        # asynchronous copy a row on the loader's side stream
        with self.pinning:  # the loader and a forward loading on demand
            if self.pinned is None:
                self.check_files()
                self.pinned = [torch.cat([t for _, t, _, _ in pieces]).pin_memory()
                               for pieces in self.pieces]
        with torch.cuda.stream(stream):
            return [rows[expert].to(device, non_blocking=True).to(dtype) for rows in self.pinned]


# --- the cache and its loader -------------------------------------------------------------

class _Entry:
    __slots__ = ("rows", "nbytes", "ready", "pins", "error", "event")

    def __init__(self, nbytes):
        self.rows, self.nbytes, self.ready, self.pins = None, nbytes, False, 0
        self.error, self.event = None, None


class ExpertCache:
    """At most ``capacity`` of loaded experts, keyed ``(layer, expert)``.

    ``plan(keys)`` announces the experts one forward pass will use, in order
    (``prefetch``); a loader thread loads them ahead, as room allows. ``get``
    pins one (loading it now if no one else will), ``release`` unpins it.

    Args:
        capacity (str): ``--hash-expert-cache`` (see :func:`parse_cache_size`)
        prefetch (bool): whether hash layers announce their experts
    """

    def __init__(self, capacity: str, prefetch: bool):
        self.capacity_spec = parse_cache_size(capacity)
        self.prefetch = prefetch
        self.capacity = None  # bytes, known once the experts' dtype is (first forward)
        self.sources: Dict[str, ExpertSource] = {}
        self.entries: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self.planned = collections.deque()  # keys the current forward will use, in order
        self.cond = threading.Condition()
        self.target = (torch.float32, torch.device("cpu"))  # dtype and device of loaded experts
        self.loader = None
        self.stream = None  # CUDA side stream of the loader
        # loads: by the loader and on demand; waits: the forward waited for the loader
        self.stats = dict(loads=0, demand_loads=0, waits=0, bytes_read=0, resident_bytes=0,
                          peak_bytes=0, turns=0)
        _CACHES.add(self)

    def add_source(self, layer: str, source: ExpertSource):
        with self.cond:
            self.sources[layer] = source
            self.capacity = None
            for key in [k for k in self.entries if k[0] == layer]:
                self._drop(key)

    def expert_bytes(self, layer: str) -> int:
        return self.sources[layer].row_bytes(self.target[0])

    def set_target(self, dtype: torch.dtype, device: torch.device):
        """The model's dtype and device (they change with ``.half()``, ``.cuda()``)."""
        with self.cond:
            if (dtype, device) != self.target:
                self.target = (dtype, device)
                for key in [k for k, e in self.entries.items() if e.pins == 0 and e.ready]:
                    self._drop(key)
                self.capacity = None
            if self.capacity is None:
                self.capacity = self._resolve_capacity()
            if device.type == "cuda" and self.stream is None:
                self.stream = torch.cuda.Stream(device)

    def _resolve_capacity(self) -> int:
        if not self.sources:
            raise HashConfigError("--hash-offload-experts: no checkpoint gave the experts' weights; "
                                  "load the model from a checkpoint (--path or from_pretrained)")
        largest = max(self.expert_bytes(layer) for layer in self.sources)
        kind, value = self.capacity_spec
        if kind == "experts":
            value = value or max(s.num_experts for s in self.sources.values())
            return int(value) * largest
        if value < largest:
            raise HashConfigError(
                f"--hash-expert-cache {value / 2**20:.3g}MB holds no expert: one takes "
                f"{largest / 2**20:.3g}MB; give at least that, or a number of experts")
        return int(value)

    # -- announcing a forward pass
    def plan(self, keys: Sequence[tuple]):
        """The experts of one forward pass, in the order its layers will use them."""
        with self.cond:
            self.planned = collections.deque(keys)
            if self.loader is None or not self.loader.is_alive():
                self.loader = threading.Thread(target=_load_ahead, args=(weakref.ref(self),),
                                               name="fairseq-hash-expert-loader", daemon=True)
                self.loader.start()
            self.cond.notify_all()

    # -- using experts
    def get(self, key: tuple) -> _Entry:
        """Expert ``key`` loaded and pinned; waits for the loader where it will load it."""
        with self.cond:
            if key in self.planned:
                while self.planned[0] != key:  # skipped: not needed after all
                    self.planned.popleft()
            waited = False
            while True:
                entry = self.entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self.entries.move_to_end(key)
                    if self.planned and self.planned[0] == key:
                        self.planned.popleft()
                    if waited or not entry.ready:
                        self.stats["waits"] += 1
                    while not entry.ready:
                        self.cond.wait()
                    if entry.error is not None:
                        entry.pins -= 1
                        self._drop(key)
                        raise entry.error
                    return entry
                loader_will = (self.planned and self.planned[0] == key and self.loader is not None
                               and self.loader.is_alive())
                if loader_will:  # (the timeout re-checks that the loader still runs)
                    waited = True
                    self.cond.wait(timeout=1)
                    continue
                # on demand: load it here, once there is room
                nbytes = self.expert_bytes(key[0])
                if not self._make_room(nbytes, before=None):
                    self.cond.wait(timeout=1)  # for the loader's current read to end
                    continue
                entry = self._insert(key, nbytes)
                entry.pins += 1
                self.stats["demand_loads"] += 1
                break
        self._fill(key, entry)
        with self.cond:
            if entry.error is not None:
                entry.pins -= 1
                self._drop(key)
                raise entry.error
        return entry

    def release(self, key: tuple):
        with self.cond:
            entry = self.entries.get(key)
            if entry is not None:
                entry.pins -= 1
            self.cond.notify_all()

    # -- bookkeeping (with self.cond held)
    def _next_use(self) -> Dict[tuple, int]:
        first = {}
        for i, key in enumerate(self.planned):
            first.setdefault(key, i)
        return first

    def _make_room(self, nbytes: int, before: Optional[int]) -> bool:
        """Evict until ``nbytes`` fit; only experts next used after position
        ``before`` of the plan (None: any unpinned one). False if they cannot fit."""
        next_use = self._next_use()
        never = len(self.planned) + 1
        victims = sorted(
            (k for k, e in self.entries.items()
             if e.pins == 0 and e.ready and (before is None or next_use.get(k, never) > before)),
            key=lambda k: -next_use.get(k, never))  # furthest first; stable: least recent first
        free = self.capacity - self.stats["resident_bytes"]
        if free + sum(self.entries[k].nbytes for k in victims) < nbytes:
            return False
        for key in victims:
            if free >= nbytes:
                break
            free += self.entries[key].nbytes
            self._drop(key)
        return True

    def _insert(self, key, nbytes) -> _Entry:
        entry = self.entries[key] = _Entry(nbytes)
        self.stats["resident_bytes"] += nbytes
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self.stats["resident_bytes"])
        return entry

    def _drop(self, key):
        entry = self.entries.pop(key)
        self.stats["resident_bytes"] -= entry.nbytes

    def _next_to_load(self):
        """The first planned expert not loaded, if room can be made for it."""
        for position, key in enumerate(self.planned):
            if key in self.entries:
                continue
            nbytes = self.expert_bytes(key[0])
            if self._make_room(nbytes, before=position):
                return key, self._insert(key, nbytes)
            return None
        return None

    def _fill(self, key, entry: _Entry):
        """Read ``key`` from its source into ``entry`` (without the lock)."""
        source = self.sources[key[0]]
        dtype, device = self.target
        try:
            rows = source.read(key[1], dtype, device, self.stream)
            if device.type == "cuda":
                entry.event = torch.cuda.Event()
                entry.event.record(self.stream)
        except BaseException as exc:  # handed to the forward that waits for it
            rows, entry.error = None, exc
        with self.cond:
            entry.rows, entry.ready = rows, True
            if rows is not None:
                self.stats["loads"] += 1
                self.stats["bytes_read"] += source.row_bytes()
            self.cond.notify_all()

    def turns(self, layer_keys: Sequence[tuple]) -> List[List[tuple]]:
        """``layer_keys`` cut into turns whose experts fit in the cache together.

        With prefetch a turn takes at most half the cache, so that the loader
        reads the next turn's experts into the other half while this one computes.
        """
        budget = self.capacity // 2 if self.prefetch else self.capacity
        turns, current, size = [], [], 0
        for key in layer_keys:
            nbytes = self.expert_bytes(key[0])
            if current and size + nbytes > budget:
                turns.append(current)
                current, size = [], 0
            current.append(key)
            size += nbytes
        return turns + [current] if current else turns


def _load_ahead(cache_ref):
    """The loader thread: planned experts in order of use; ends after 10 s idle."""
    while True:
        cache = cache_ref()
        if cache is None:
            return
        with cache.cond:
            job = cache._next_to_load()
            if job is None:
                idle = not cache.cond.wait(timeout=10)
                if idle and not cache.planned:
                    cache.loader = None
                    return
                continue
        cache._fill(*job)
        del cache


def offload_stats() -> Dict[str, int]:
    """All caches' counters summed (loads, bytes_read, peak_bytes, ...)."""
    total = collections.Counter()
    for cache in list(_CACHES):
        total.update(cache.stats)
    return dict(total)


# --- the MoE layer's experts --------------------------------------------------------------

class OffloadedExperts(nn.Module):
    """``ExpertFFN``'s computation with weights read from an :class:`ExpertCache`.

    Holds no parameter: loading a state dict gives its four ``[K, ...]``
    tensors to the cache as this layer's source. Inference only.

    Args:
        num_experts, embed_dim, ffn_dim (int): K, d, f, as for ExpertFFN
        cache (ExpertCache): shared by the offloaded layers of one encoder or decoder
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, cache: ExpertCache):
        super().__init__()
        self.local_experts = self.total_experts = num_experts
        self.first_expert = 0
        self.shapes = dict(fc1_weight=(num_experts, ffn_dim, embed_dim),
                           fc1_bias=(num_experts, ffn_dim),
                           fc2_weight=(num_experts, embed_dim, ffn_dim),
                           fc2_bias=(num_experts, embed_dim))
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
                part = [n if e in entries else 0 for e, n in enumerate(counts)]
                self._compute(x[lo:hi], y[lo:hi], part, entries)
            finally:
                for e in entries:
                    self.cache.release((self.key, e))
        return y

    @torch.no_grad()
    def _compute(self, x, y, counts, entries):
        """Each expert's rows, as ExpertFFN computes them on CPU (same products, same groups)."""
        if x.device.type == "cuda":
            stream = torch.cuda.current_stream(x.device)
            for entry in entries.values():
                stream.wait_event(entry.event)
                for row in entry.rows:  # so that the loader's frees wait for this stream
                    row.record_stream(stream)
        activation = fused_activation(self.activation_fn)
        hidden = x.new_empty(x.size(0), self.shapes["fc1_weight"][1])
        if activation is not None and dropout_inactive(self.activation_dropout):
            def work(bounds):
                for e, lo, hi in bounds:
                    w1, b1, w2, b2 = entries[e].rows
                    h = torch.addmm(b1, x[lo:hi], w1.t(), out=hidden[lo:hi])
                    h = h.clamp_(min=0) if activation == "relu" else F.gelu(h)
                    torch.addmm(b2, h, w2.t(), out=y[lo:hi])

            for_expert_groups(x.device, counts, work)
            return

        def linear(inputs, outputs, weight, bias):
            def work(bounds):
                for e, lo, hi in bounds:
                    rows = entries[e].rows
                    torch.addmm(rows[bias], inputs[lo:hi], rows[weight].t(), out=outputs[lo:hi])
            return work

        for_expert_groups(x.device, counts, linear(x, hidden, 0, 1))
        hidden = self.activation_dropout(self.activation_fn(hidden))
        for_expert_groups(x.device, counts, linear(hidden, y, 2, 3))


# --- the hooks: building, planning, loading checkpoints ----------------------------------

def build_expert_cache(spec) -> Optional[ExpertCache]:
    """The cache of one encoder or decoder (``spec``: a validated HashLayerSpec),
    or None when its experts stay resident."""
    if spec.offload_experts == "none":
        return None
    return ExpertCache(spec.expert_cache, prefetch=spec.offload_experts == "prefetch")


def plan_prefetch(moe_layers, plans: dict) -> dict:
    """Every offloaded hash layer's experts for one forward pass, in its ``LayerPlan``
    (``experts``), announced to the cache in the order the layers will use them.

    ``moe_layers`` maps layer index -> MoELayer in the order they run; ``plans``
    (layer index -> LayerPlan) hold each hash layer's counts, computed from the
    token ids before the first layer (``moe_layer.plan_hash_dispatch``): the
    experts with rows are exactly those the layer will use. Returns ``plans``.
    """
    keys, cache = [], None
    for idx, moe in moe_layers.items():
        experts, plan = moe.experts, plans.get(idx)
        if (plan is None or plan.counts is None or not isinstance(experts, OffloadedExperts)
                or not experts.cache.prefetch or experts.key is None):
            continue
        experts.prepare()
        plan.experts = [e for e, n in enumerate(plan.counts) if n]
        keys += [(experts.key, e) for e in plan.experts]
        cache = experts.cache
    if cache is not None:
        cache.plan(keys)
    return plans


def map_expert_tensors(model_state: dict, path: str) -> int:
    """Replace the expert stacks of a loaded state dict by views of ``path`` mapped
    into memory (``torch.load(mmap=True)``), so that no expert stays in memory.

    Stacks already mapped from a file (a loader that maps its shards) are kept.
    Returns the number replaced.
    """
    keys = [k for k, v in model_state.items()
            if k.rsplit(".", 1)[-1] in EXPERT_PARAMS and ".experts." in k and torch.is_tensor(v)]
    mappings = _file_mappings()
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


def install_offload_loading():
    """Wrap fairseq's ``checkpoint_utils.load_checkpoint_to_cpu``, which every serving
    tool and the hub interface load through: with ``hash_offload_experts`` among
    the overrides, the loaded experts are memory-mapped from the file instead.

    fairseq reads the checkpoint with ``torch.load`` on an open file, which torch
    cannot map (``mmap=True`` needs a path), so the whole file passes through
    memory once while loading; the experts' copies are freed right after.
    """
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    load = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(load, "_fairseq_hash_offload", False):
        return

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        mode = (arg_overrides or {}).get("hash_offload_experts", "none") or "none"
        if mode == "none":
            return load(path, arg_overrides, load_on_all_ranks)
        check_offload_mode(mode)
        try:
            state = load(path, arg_overrides, load_on_all_ranks)
        except (RuntimeError, EOFError) as exc:  # torch's zip reader on a cut file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HashConfigError(f"--hash-offload-experts: cannot read the checkpoint {path} "
                                  f"({reason}); is it truncated?") from None
        _give_overrides(state, arg_overrides)
        if "model" in state:
            map_expert_tensors(state["model"], PathManager.get_local_path(path))
        return state

    load_checkpoint_to_cpu._fairseq_hash_offload = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
