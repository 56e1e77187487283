"""The loaded experts of one encoder or decoder, at most ``--hash-expert-cache``
of them: :class:`ExpertCache` and its loader thread.

Knowing the exact order of use of the coming forward, the cache evicts the
expert used furthest in the future (Belady's rule), experts no longer planned
first, least recently used first among those.
"""
import atexit
import collections
import threading
import weakref
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import HashConfigError
from . import cuda
from .flags import parse_cache_size
from .store import ExpertSource

_CACHES = weakref.WeakSet()  # every cache of the process, for offload_stats()


class _Entry:
    # event: (CUDA) its copy is done; used: (CUDA) the forward's last use of it is done
    __slots__ = ("rows", "nbytes", "ready", "pins", "error", "event", "used")

    def __init__(self, nbytes):
        self.rows, self.nbytes, self.ready, self.pins = None, nbytes, False, 0
        self.error, self.event, self.used = None, None, None


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
        self._expert_bytes = {}  # layer -> bytes of one of its experts in the target dtype
        self.sources: Dict[str, ExpertSource] = {}
        self.entries: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self.planned = collections.deque()  # keys the current forward will use, in order
        self.advised = set()  # planned keys whose reading the kernel was asked to start
        self.computing = False  # a layer computes a turn: its pinned experts are soon free
        # (CUDA) dropped experts the device may still read: (key, entry), oldest first;
        # their bytes count until it is done, so device memory stays within the bound
        self.retiring = collections.deque()
        self.closing = False  # the process exits: the loader stops
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
            for key in [k for k in self.entries if k[0] == layer]:
                self._drop(key)
            self.sources[layer] = source
            self.capacity, self._expert_bytes = None, {}

    def expert_bytes(self, layer: str) -> int:
        nbytes = self._expert_bytes.get(layer)
        if nbytes is None:  # asked for every planned expert on every load
            nbytes = self._expert_bytes[layer] = self.sources[layer].row_bytes(self.target[0])
        return nbytes

    def set_target(self, dtype: torch.dtype, device: torch.device):
        """The model's dtype and device (they change with ``.half()``, ``.cuda()``)."""
        with self.cond:
            if (dtype, device) != self.target:
                self.target = (dtype, device)
                for key in [k for k, e in self.entries.items() if e.pins == 0 and e.ready]:
                    self._drop(key)
                self.capacity, self._expert_bytes = None, {}
            if self.capacity is None:
                self.capacity = self._resolve_capacity()
            if device.type == "cuda" and self.stream is None:
                self.stream = cuda.side_stream(device)

    def _resolve_capacity(self) -> int:
        if not self.sources:
            raise HashConfigError("--hash-offload-experts: no checkpoint gave the experts' weights; "
                                  "load the model from a checkpoint (--path or from_pretrained)")
        largest = max(self.expert_bytes(layer) for layer in self.sources)
        kind, value = self.capacity_spec
        if kind == "experts":
            value = value or max(s.total_experts for s in self.sources.values())
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
            self.advised = set()
            if self.loader is None or not self.loader.is_alive():
                self.loader = threading.Thread(target=_load_ahead, args=(weakref.ref(self),),
                                               name="fairseq-hash-expert-loader", daemon=True)
                self.loader.start()
            self.cond.notify_all()

    # -- using experts
    def get(self, key: tuple) -> _Entry:
        """Expert ``key`` loaded and pinned; waits for the loader where it will load it."""
        if self.target[1].type == "cpu":  # on CPU a loaded expert may be served where it is mapped
            self.sources[key[0]].check_files()
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
                if entry.pins == 0 and self.target[1].type == "cuda":
                    entry.used = cuda.used_until(self.target[1])
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
        self._reap()
        next_use = self._next_use()
        never = len(self.planned) + 1
        victims = sorted(
            (k for k, e in self.entries.items()
             if e.pins == 0 and e.ready and (before is None or next_use.get(k, never) > before)),
            key=lambda k: -next_use.get(k, never))  # furthest first; stable: least recent first
        free = self.capacity - self.stats["resident_bytes"]
        retiring = sum(e.nbytes for _, e in self.retiring)
        if free + retiring + sum(self.entries[k].nbytes for k in victims) < nbytes:
            return False
        if before is not None and self.computing:
            # rather than evict an expert the plan uses again (to read it twice),
            # wait for the computing turn's experts, which it does not use again
            unused = free + sum(self.entries[k].nbytes for k in victims if k not in next_use)
            soon = sum(e.nbytes for k, e in self.entries.items() if e.pins and k not in next_use)
            if unused < nbytes <= unused + soon:
                return False
        for key in victims:
            if free + retiring >= nbytes:
                break
            free += self.entries[key].nbytes
            self._drop(key)
        while self.retiring and self.capacity - self.stats["resident_bytes"] < nbytes:
            self.retiring[0][1].used.synchronize()  # the device reads it still: wait for it
            self._reap()
        return True

    def _insert(self, key, nbytes) -> _Entry:
        entry = self.entries[key] = _Entry(nbytes)
        self.stats["resident_bytes"] += nbytes
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self.stats["resident_bytes"])
        return entry

    def _drop(self, key):
        entry = self.entries.pop(key)
        if entry.used is not None and not entry.used.query():
            self.retiring.append((key, entry))  # the device still reads it: see _reap
            return
        self._forget(key, entry)

    def _forget(self, key, entry):
        self.stats["resident_bytes"] -= entry.nbytes
        if entry.ready and entry.rows is not None:
            self.sources[key[0]].forget(key[1], entry.rows)

    def _reap(self):
        """Forget the dropped experts the device is done with (CUDA: the host runs
        ahead of the device, which may still read an expert the cache dropped)."""
        for key, entry in [r for r in self.retiring if r[1].used.query()]:
            self.retiring.remove((key, entry))
            self._forget(key, entry)

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

    def _to_read_ahead(self) -> List[tuple]:
        """Planned experts not yet asked for, in plan order, as far as a cache's
        worth of bytes beyond what is loaded: the kernel reads them while the
        loader waits for earlier ones and the layers compute."""
        out, budget = [], self.capacity
        for key in self.planned:
            entry = self.entries.get(key)
            if entry is not None and entry.ready:
                continue
            budget -= self.expert_bytes(key[0])
            if budget < 0:
                break
            if key not in self.advised:
                self.advised.add(key)
                out.append(key)
        return out

    def _fill(self, key, entry: _Entry):
        """Read ``key`` from its source into ``entry`` (without the lock)."""
        source = self.sources[key[0]]
        dtype, device = self.target
        try:
            rows = source.read(key[1], dtype, device, self.stream)
            if device.type == "cuda":
                entry.event = cuda.copied(self.stream)
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
            if cache.closing:  # the process exits (_stop_loaders)
                cache.loader = None
                return
            ahead = cache._to_read_ahead() if cache.target[1].type == "cpu" else []
            job = cache._next_to_load()
            if job is None and not ahead:
                idle = not cache.cond.wait(timeout=10)
                if idle and not cache.planned:
                    cache.loader = None
                    return
                continue
        for layer, expert in ahead:
            cache.sources[layer].read_ahead(expert)
        if job is not None:
            cache._fill(*job)
        del cache


@atexit.register
def _stop_loaders():
    """At exit, each loader ends before the interpreter and torch tear down: a loader
    still inside a CUDA call then would abort the process (seen on an H200: every test
    passed, then "terminate called without an active exception")."""
    for cache in list(_CACHES):
        with cache.cond:
            cache.closing = True
            cache.cond.notify_all()
            loader = cache.loader
        if loader is not None and loader is not threading.current_thread():
            loader.join(timeout=10)


def offload_stats() -> Dict[str, int]:
    """All caches' counters summed (loads, bytes_read, peak_bytes, ...)."""
    total = collections.Counter()
    for cache in list(_CACHES):
        total.update(cache.stats)
    return dict(total)


def build_expert_cache(spec) -> Optional[ExpertCache]:
    """The cache of one encoder or decoder (``spec``: a validated HashLayerSpec),
    or None when its experts stay resident."""
    if spec.offload_experts == "none":
        return None
    return ExpertCache(spec.expert_cache, prefetch=spec.offload_experts == "prefetch")
