"""CPU: the experts' products in groups, at once, on a fixed pool of threads.

    for_expert_groups(x.device, counts, work)   # work(bounds): bounds = [(e, lo, hi), ...]

The grouped products (``experts.py``) hand their loop over experts to
:func:`for_expert_groups`: on CPU it splits the experts into groups of about
equal rows and runs each group in a pool worker with its share of torch's
intra-op threads; elsewhere it calls ``work`` once on every expert.
$FAIRSEQ_HASH_EXPERT_THREADS sets the threads (default: torch's).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Collection, List, Optional

import torch


def _bounds(counts: List[int]):
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


_POOL = None  # (threads, ThreadPoolExecutor) running the expert groups
_WORKER = threading.local()  # .threads: the intra-op threads a pool worker was given


def expert_threads() -> int:
    """Threads for experts on CPU: $FAIRSEQ_HASH_EXPERT_THREADS, else torch's threads."""
    return int(os.environ.get("FAIRSEQ_HASH_EXPERT_THREADS", 0)) or torch.get_num_threads()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One worker a thread, made once: remade only if the thread count changes,
    never with the number of experts that received tokens (every decoding step)."""
    global _POOL
    if _POOL is None or _POOL[0] != threads:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        # torch sets a thread's intra-op count from the process's on the
        # thread's first parallel op; done here, it cannot undo a share later
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="fairseq-hash-experts",
                                             initializer=torch.get_num_threads))
    return _POOL[1]


def _run_group(work: Callable, group, share: int, changed: list):
    """``work(group)`` in a pool worker, with ``share`` intra-op threads.

    torch's intra-op thread count is per thread with its OpenMP backend (the
    default on Linux, macOS and Windows): ``torch.set_num_threads`` sets the
    calling thread's OpenMP and MKL counts, which only this worker reads. It
    also sets the count that threads started later take up, so the caller
    gives the process's count back (``changed``) once the groups are done.
    """
    if getattr(_WORKER, "threads", None) != share:
        changed.append(share)
        torch.set_num_threads(share)
        _WORKER.threads = share
    with torch.no_grad():  # grad mode is per thread; these are out= products
        work(group)


def for_expert_groups(device: torch.device, counts: List[int], work: Callable,
                      only: Optional[Collection[int]] = None):
    """Call ``work(bounds)`` on groups of experts covering all rows.

    On CPU the experts are split into groups of about equal rows, at most one
    a thread, and the groups run at once, each with its share of the threads
    (with 2 threads and 16 experts: 2 groups of 1 thread; with 32 threads and
    4 experts: 4 groups of 8). An expert's products are small (S/K rows); run
    one after another, each with all threads, every product ends in a barrier
    where all threads wait for the slowest, and on a shared machine that is
    one descheduled thread (BENCHMARKS.md measures both ways). Elsewhere, and
    for one group, ``work`` runs here on all experts.

    ``only`` runs just those experts, each with the threads it has when all of
    ``counts`` run at once: a product's rounding can depend on its thread
    count, so an offloaded layer computing its experts in turns rounds as the
    resident layer does.
    """
    bounds = list(_bounds(counts))
    if not bounds:
        return
    threads = expert_threads() if device.type == "cpu" else 1
    workers = min(threads, len(bounds))
    if workers <= 1:
        work([b for b in bounds if only is None or b[0] in only])
        return
    total = sum(hi - lo for _, lo, hi in bounds)
    groups = [[] for _ in range(workers)]
    for e, lo, hi in bounds:  # contiguous runs of experts, split at equal rows
        groups[min(workers - 1, (lo + hi) * workers // (2 * total))].append((e, lo, hi))
    groups = [g for g in groups if g]
    shares = [threads // len(groups) + (i < threads % len(groups)) for i in range(len(groups))]
    if only is not None:
        kept = [([b for b in g if b[0] in only], share) for g, share in zip(groups, shares)]
        groups = [g for g, _ in kept if g]
        shares = [share for g, share in kept if g]
    changed = []
    futures = [_pool(threads).submit(_run_group, work, g, share, changed)
               for g, share in zip(groups, shares)]
    wait(futures)
    if changed:
        torch.set_num_threads(torch.get_num_threads())  # this thread's count is the process's
    for future in futures:
        future.result()  # a worker's error is raised here
