"""Where an offloaded layer's expert weights are read from: :class:`ExpertSource`."""
import os
import queue
import threading
from typing import Dict, Optional

import torch

from ..errors import HashConfigError
from . import cuda
from .mapped import (drop_page_cache, file_mappings, file_position, populate, read_ahead,
                     release_pages)

# ExpertFFN's parameters, in the order an expert's rows are read
EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


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
        self.total_experts = sum(t.size(0) for _, t in self.pieces[0])
        mappings = file_mappings()
        # per parameter, per piece: (first row, tensor, file, offset of its first row)
        self.pieces = [[(first, t, *file_position(t, mappings)) for first, t in pieces]
                       for pieces in self.pieces]
        self.files = sorted({f for pieces in self.pieces for _, _, f, _ in pieces if f})
        # the mapped length of each file: reading past a truncated file's end
        # would kill the process (SIGBUS), so a shorter file is refused first
        self.file_sizes = {f: os.path.getsize(f) for f in self.files}
        self.pinned = None  # on CUDA: the pieces in pinned host memory, in the model's dtype
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
        if not 0 <= expert < self.total_experts:
            raise IndexError(f"{self.name}: expert {expert} of {self.total_experts}")
        for pieces in self.pieces:
            first, t, path, offset = next(p for p in pieces if p[0] <= expert < p[0] + p[1].size(0))
            row = t[expert - first]
            yield row, path, offset + (expert - first) * row.numel() * row.element_size()

    def read_ahead(self, expert: int):
        """Ask the kernel to read expert ``expert``'s rows from their files now, in
        the background (see :func:`mapped.read_ahead`)."""
        for row, path, _ in self._rows(expert):
            if path:
                read_ahead(row)

    def read(self, expert: int, dtype: torch.dtype, device: torch.device, stream=None):
        """Expert ``expert``'s four rows as tensors of ``dtype`` on ``device``.

        On CPU a row mapped from a file, already of ``dtype`` and aligned as
        torch aligns its own memory (64 bytes), is served where it is mapped:
        its pages are read in and mapped now (:func:`mapped.populate`), nothing
        is copied, and :meth:`forget` gives them back. Any other row is copied.
        """
        if device.type == "cuda":
            return self._read_cuda(expert, dtype, device, stream)
        self.check_files()
        rows = list(self._rows(expert))
        for row, path, _ in rows:  # all four rows in flight before waiting for any
            if path:
                read_ahead(row)
        out = []
        for row, path, offset in rows:
            if path and row.dtype == dtype and row.data_ptr() % 64 == 0 and populate(row):
                out.append(row)
                continue
            out.append(torch.empty(row.shape, dtype=dtype).copy_(row))
            if path:
                self._give_back(row, path, offset)
        return out

    def forget(self, expert: int, rows):
        """The cache dropped expert ``expert`` (``rows``, as :meth:`read` gave them):
        give back the mapped pages it was served from."""
        for served, (row, path, offset) in zip(rows or (), self._rows(expert)):
            if path and served.device.type == "cpu" and served.data_ptr() == row.data_ptr():
                self._give_back(row, path, offset)

    def _give_back(self, row, path, offset):
        release_pages(row)
        if self.uncached:
            _evict_later(path, offset, row.numel() * row.element_size())

    def _read_cuda(self, expert, dtype, device, stream):
        with self.pinning:  # the loader and a forward loading on demand
            if self.pinned is None or self.pinned[0].dtype != dtype:
                self.check_files()
                self.pinned = None  # the old dtype's copy goes before the new one is made
                self.pinned = cuda.pin(self.pieces, dtype)
        return cuda.copy_rows(self.pinned, expert, device, stream)


_EVICTIONS = None  # the benchmark's cold runs: (path, offset, length) to drop from the page cache


def _evict_later(path: str, offset: int, length: int):
    """Drop a file range from the page cache on a thread of its own, as the
    kernel reclaims pages on its own threads when a file does not fit in
    memory: the thread that gave the range back (a layer loading on demand,
    or the loader) does not pay for it."""
    global _EVICTIONS
    if _EVICTIONS is None:
        _EVICTIONS = queue.SimpleQueue()
        threading.Thread(target=_evict, args=(_EVICTIONS,), daemon=True,
                         name="fairseq-hash-page-cache-eviction").start()
    _EVICTIONS.put((path, offset, length))


def _evict(ranges):
    while True:
        drop_page_cache(*ranges.get())
