"""Layer mode of ``fairseq-hash-bench``: one routed FFN sublayer beside a dense one.

    rows = run_layers(args, torch.device("cpu"), torch.float32)   # args from bench.parse_args
    print_layer_table(rows)

Layer mode times forward plus backward of one FFN sublayer (the median of
``--repeat`` interleaved rounds after a warm-up run) and measures its memory,
for each implementation of layer_cases.py. ``peak_mb`` is the memory allocated
during one forward and backward (activations, temporaries, gradients) at its
highest point, beyond what was allocated before (weights, inputs): the CUDA
allocator's peak on GPU; on CPU, the running sum of what each op the profiler
saw allocated net (a temporary an op frees before it returns is not counted).
``act_mb`` counts the tensors autograd saves for backward, parameters
excluded: the activation memory.
"""
import contextlib
import gc
import logging
import statistics
import sys
from contextlib import contextmanager
from typing import Dict, List

import torch
from torch.utils.benchmark import Timer

from .layer_cases import FLOOR_OF, Impl, build_case, environment

logger = logging.getLogger("fairseq_hash.bench")


# ----------------------------------------------------------------------------
# Time and memory


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impls(built: Dict[str, Impl], repeat: int, notes: Dict[str, str]):
    """Median ms of forward+backward; rounds interleave the implementations.

    One ``Timer.timeit(1)`` a round rather than ``blocked_autorange`` per
    implementation: on a shared machine the load drifts, and interleaving the
    implementations in rotating order gives each the same conditions. The
    Timer synchronizes the GPU and runs at torch's current thread count.
    An implementation whose warm-up step fails is dropped, its error in ``notes``.
    """
    timers = {}
    for n, impl in built.items():  # warm-up: allocator, kernels, lazy initialisation
        try:
            impl.step()
        except Exception as err:  # e.g. fairscale's float32 mask with a bf16 input
            notes[n] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            continue
        timers[n] = Timer("impl.step()", globals={"impl": impl},
                          num_threads=torch.get_num_threads())
    names = list(timers)
    times = {n: [] for n in names}
    for r in range(repeat):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:  # each goes first in some round
            times[n].append(timers[n].timeit(1).median * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


def cpu_peak_bytes(events) -> int:
    """Highest running sum of the memory the profiled ops allocated and freed, in time order.

    From the profiler's public events, which give each op's own net
    allocation (children excluded) but not when inside the op it happened:
    what an op allocates counts from its start, what it frees from its end.
    A temporary that an op allocates and frees itself is not counted.
    """
    changes = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
                      e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
    current = peak = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextmanager
def saved_tensor_bytes(params):
    """Count the bytes of distinct storages autograd saves, parameters excluded."""
    owned = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    box = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["bytes"] = sum(seen.values())


def measure_memory(impl: Impl, device):
    """(peak_mb, act_mb) of one forward and backward.

    On CPU the profiled ops' net allocations are summed in time order. It sees
    the thread that runs it, so the expert groups run on that one thread here
    (``FAIRSEQ_HASH_EXPERT_THREADS=1``): each further group thread adds one
    ``[S/K, f]`` hidden-gradient buffer to the peak.
    """
    gc.collect()
    for t in impl.params + impl.inputs:
        t.grad = None
    env = dict(impl.env)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        profiler = contextlib.nullcontext()
    else:
        env["FAIRSEQ_HASH_EXPERT_THREADS"] = "1"
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          profile_memory=True)
    with environment(env), profiler:
        with saved_tensor_bytes(impl.params) as saved:
            outputs, grads = impl.run()
        torch.autograd.backward(outputs, grads)
        del outputs
    if device.type == "cuda":
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = cpu_peak_bytes(profiler.events()) / 2**20
    return peak, saved["bytes"] / 2**20


# ----------------------------------------------------------------------------
# Layer mode


def run_layers(args, device, dtype) -> List[dict]:
    rows = []
    tokens = args.tokens or [8192]
    for S in tokens:
        for K in args.experts:
            built, notes = build_case(args.impls, S, K, args.embed_dim, args.ffn_dim, dtype, device)
            ms = time_impls(built, args.repeat, notes)
            for name in args.impls:
                if name in ms:
                    rows.append(dict(impl=name, experts=K, tokens=S, ms=round(ms[name], 3)))
                else:
                    logger.warning(f"skipped {name} (tokens {S}, experts {K}): {notes[name]}")
            del built
            gc.collect()
    if args.memory:  # after all timings: the profiler must not slow them
        for S in tokens:
            for K in args.experts:
                built, _ = build_case(args.impls, S, K, args.embed_dim, args.ffn_dim, dtype,
                                      device)
                timed = {(r["impl"], r["experts"], r["tokens"]) for r in rows}
                for name, impl in built.items():
                    if (name, K, S) not in timed:
                        continue
                    impl.step()  # first touch of the weights' gradients and caches
                    peak, act = measure_memory(impl, device)
                    for row in rows:
                        if (row["impl"], row["experts"], row["tokens"]) == (name, K, S):
                            row["peak_mb"], row["act_mb"] = round(peak, 1), round(act, 1)
                del built
                gc.collect()
    for row in rows:
        row.setdefault("peak_mb", None)
        dense = [r["ms"] for r in rows if r["impl"] == "dense"
                 and (r["experts"], r["tokens"]) == (row["experts"], row["tokens"])]
        row["x_dense"] = round(row["ms"] / dense[0], 3) if dense else None
    return rows


def print_layer_table(rows, out=sys.stdout):
    print(f"{'tokens':>7} {'experts':>7}  {'impl':<12} {'ms':>9} {'x dense':>8} "
          f"{'x floor':>8} {'peak_mb':>8} {'act_mb':>7}", file=out)
    for row in rows:
        floor = [r["ms"] for r in rows if r["impl"] == FLOOR_OF.get(row["impl"], "floor")
                 and (r["experts"], r["tokens"]) == (row["experts"], row["tokens"])]
        x_floor = f"{row['ms'] / floor[0]:8.3f}" if floor else f"{'-':>8}"
        x_dense = f"{row['x_dense']:8.3f}" if row.get("x_dense") else f"{'-':>8}"
        peak = f"{row['peak_mb']:8.1f}" if row.get("peak_mb") is not None else f"{'-':>8}"
        act = f"{row['act_mb']:7.1f}" if row.get("act_mb") is not None else f"{'-':>7}"
        print(f"{row['tokens']:>7} {row['experts']:>7}  {row['impl']:<12} {row['ms']:9.1f} "
              f"{x_dense} {x_floor} {peak} {act}", file=out)
