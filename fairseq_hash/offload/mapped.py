"""Memory mapped from a file, seen from the process: which file a tensor's pages
come from, asking the kernel to read them ahead or to map them now, giving
them back, and evicting a file from the page cache.

Linux and macOS (``madvise``); elsewhere a tensor has no known file, nothing
is read ahead and no page is given back. Mapping pages now
(``MADV_POPULATE_READ``) needs Linux 5.14 or later.
"""
import ctypes
import mmap
import os
import sys
from typing import List, Optional, Tuple

import torch

_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3  # Linux and macOS
_MADV_DONTNEED = 4  # Linux and macOS
_MADV_POPULATE_READ = 22  # Linux 5.14+
_LIBC = None


def _madvise():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def file_mappings() -> List[Tuple[int, int, int, str]]:
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
    for start, end, offset, path in mappings if mappings is not None else file_mappings():
        if start <= address < end:
            return path, address - start + offset
    return None, 0


def backing_file(tensor: torch.Tensor, mappings=None) -> Optional[str]:
    """The file ``tensor``'s memory is mapped from, or None (ordinary memory)."""
    return file_position(tensor, mappings)[0]


def _advise(tensor: torch.Tensor, advice: int) -> bool:
    """``madvise`` on the pages of ``tensor``'s memory; False where it failed or is missing."""
    madvise = _madvise()
    if not madvise or tensor.numel() == 0:
        return False
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) == 0


def read_ahead(tensor: torch.Tensor):
    """Ask the kernel to start reading the file pages of mapped ``tensor`` now,
    in the background (``MADV_WILLNEED``): one large read instead of a page
    fault's read at a time when the pages are touched."""
    _advise(tensor, _MADV_WILLNEED)


def populate(tensor: torch.Tensor) -> bool:
    """Map the pages of file-mapped ``tensor`` into the process now, reading
    those not in the page cache (``MADV_POPULATE_READ``), so that computing on
    it takes no page fault. False where the kernel cannot (before Linux 5.14,
    macOS): the caller copies instead."""
    return sys.platform.startswith("linux") and _advise(tensor, _MADV_POPULATE_READ)


def release_pages(tensor: torch.Tensor):
    """Drop this process's mapped pages of a file-mapped, never-written ``tensor``.

    The file's pages stay in the kernel's page cache; the process's resident
    set no longer counts them, and a later read maps them again from the file.
    Only for memory mapped from a file: on ordinary memory it would lose data.
    """
    _advise(tensor, _MADV_DONTNEED)


def drop_page_cache(path: str, offset: int = 0, length: int = 0):
    """Evict a file's pages (all of it for length 0) from the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

