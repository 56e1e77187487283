"""Transparent huge pages for torch's large CPU tensors, on by default.

A hash layer with K experts hands autograd a fresh ``[K, f, d]`` weight
gradient at every backward (268 MB per linear map at K=64, d=512, f=2048),
and fairseq's Adam makes ``[K, f, d]`` temporaries at every step. With 4 KB
pages the kernel faults and zeroes each page on first touch: allocating and
filling 268 MB took 112 ms here, 16 ms with 2 MB pages, and at 2048 tokens
per update the page faults alone cost a K=64 model about 10% of its training
speed (BENCHMARKS.md).

torch gives tensors of 2 MB or more huge pages when ``THP_MEM_ALLOC_ENABLE=1``
is in the environment when it makes its first CPU tensor, and importing this
package sets it unless it is already set: ``THP_MEM_ALLOC_ENABLE=0`` keeps
torch's default. fairseq imports ``--user-dir`` before it builds any tensor,
and processes started from here inherit the setting. The kernel must allow
``madvise`` (``/sys/kernel/mm/transparent_hugepage/enabled`` not ``never``);
elsewhere the setting does nothing.
"""
import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def request_huge_pages():
    """Ask torch for huge pages for large CPU tensors, unless the user chose."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault(THP_ENV, "1")


def kernel_huge_pages() -> str:
    """The kernel's THP mode: "always", "madvise", "never" or "unknown"."""
    try:
        with open(THP_SYSFS) as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unknown"
