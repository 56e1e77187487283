"""Where an offloaded ``fairseq-eval-lm`` pass spends its time, per thread (docs/offload.md).

    python -m fairseq_hash.cli.bench.offload --quick --workdir W    # writes W/hash.pt, W/data-bin
    OMP_NUM_THREADS=1 python benchmarks/offload_profile.py W prefetch [--cold] [--copy] [--no-wait]

Runs fairseq-eval-lm as the offload benchmark does and prints its tokens/s, then
wall and CPU seconds (``time.perf_counter``, ``time.thread_time``) of the cache's
``get`` (the forward waiting for or loading an expert), ``_fill`` (a load), the
layers' products and the model's forward, by thread (main: the forward; loader),
and the cache's counters. ``--copy``: load by copying, as before the loader
mapped experts; ``--no-wait``: the loader evicts what the plan uses again rather
than wait for the computing turn.
"""
import argparse
import collections
import json
import os
import sys
import threading
import time

import fairseq_hash
from fairseq_hash.offload import cache as cache_module, experts, store
from fairseq_hash.offload import drop_page_cache, offload_stats

SPENT = collections.defaultdict(float)


def timed(owner, name, tag):
    plain = getattr(owner, name)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return plain(*args, **kwargs)
        finally:
            who = "main" if threading.current_thread() is threading.main_thread() else "loader"
            SPENT[f"{tag} {who} wall"] += time.perf_counter() - wall
            SPENT[f"{tag} {who} cpu"] += time.thread_time() - cpu

    setattr(owner, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="--workdir of python -m fairseq_hash.cli.bench.offload")
    parser.add_argument("mode", choices=["prefetch", "demand"])
    parser.add_argument("--cache", default="64", help="--hash-expert-cache (default 64)")
    parser.add_argument("--cold", action="store_true", help="the page cache cold, as the benchmark's")
    parser.add_argument("--copy", action="store_true", help="load experts by copying them")
    parser.add_argument("--no-wait", action="store_true",
                        help="never wait for the computing turn's experts")
    opts = parser.parse_args()
    checkpoint = os.path.join(opts.workdir, "hash.pt")
    if opts.copy:
        store.populate = lambda tensor: False
    if opts.no_wait:
        cache_module.ExpertCache.computing = property(lambda self: False, lambda self, v: None)
    store.ExpertSource.uncached = opts.cold
    timed(cache_module.ExpertCache, "get", "get")
    timed(cache_module.ExpertCache, "_fill", "load")
    timed(experts.OffloadedExperts, "_compute", "products")
    from fairseq.models import FairseqLanguageModel
    import fairseq_cli.eval_lm as eval_lm

    timed(FairseqLanguageModel, "forward", "forward")
    plain = eval_lm.eval_lm

    def evaluate(*args, **kwargs):
        if opts.cold:
            drop_page_cache(checkpoint)
        return plain(*args, **kwargs)

    eval_lm.eval_lm = evaluate
    overrides = dict(hash_offload_experts=opts.mode, hash_expert_cache=opts.cache)
    sys.argv = ["fairseq-eval-lm", os.path.join(opts.workdir, "data-bin"), "--path", checkpoint,
                "--cpu", "--user-dir", os.path.dirname(fairseq_hash.__file__),
                "--max-tokens", "2048", "--tokens-per-sample", "256",
                "--model-overrides", repr(overrides)]
    eval_lm.cli_main()  # logs "Evaluated N tokens in Xs (Y tokens/s)"
    print(f"load average {os.getloadavg()[0]:.2f}")
    for key in sorted(SPENT):
        print(f"{key:24s} {SPENT[key]:7.3f} s")
    print(json.dumps(offload_stats()))


if __name__ == "__main__":
    main()
