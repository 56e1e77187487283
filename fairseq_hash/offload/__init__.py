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

One module a job, in the order data flows:

- ``loading``: the checkpoint's expert stacks memory-mapped from its file
  (:func:`~.loading.map_if_asked`, called by the plugin's wrapper of fairseq's
  ``load_checkpoint_to_cpu``).
- ``store``: :class:`ExpertSource`, one layer's K experts as ``[K, ...]``
  tensors, mapped from the checkpoint file or whatever tensors a checkpoint
  loader handed over (one file or shards alike). Reading expert e copies its
  four rows and gives the mapped pages back (``mapped``), so that the process
  keeps only what the cache holds.
- ``cache``: :class:`ExpertCache`, the loaded experts of all offloaded layers
  of one encoder or decoder, at most ``--hash-expert-cache`` of them (a count
  or MB, ``flags``), and its loader thread.
- ``experts``: :class:`OffloadedExperts` takes the place of ``ExpertFFN`` in a
  MoE layer; no parameters. Its forward fetches the experts that received rows
  (in turns when they do not fit in the cache together) and computes each
  expert's rows with the same products, in the same groups, as ``ExpertFFN``
  on CPU. :func:`plan_prefetch` announces a forward's experts to the cache.
- ``lookahead``: fairseq-eval-lm's next batch told to the offloaded models
  before the current one runs (:func:`~.lookahead.announce_ahead`), so that
  its experts load while this batch finishes.
- ``cuda``: on CUDA the sources are pinned in host memory on first use and
  the loader copies the needed experts on a side stream; the forward waits on
  that copy's event.
"""
from .cache import ExpertCache, build_expert_cache, offload_stats
from .experts import OffloadedExperts, plan_prefetch
from .flags import check_offload_mode, parse_cache_size
from .mapped import drop_page_cache
from .store import ExpertSource

__all__ = ["ExpertCache", "ExpertSource", "OffloadedExperts", "build_expert_cache",
           "check_offload_mode", "drop_page_cache", "offload_stats", "parse_cache_size",
           "plan_prefetch"]
