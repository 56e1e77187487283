"""The next batch's experts, loaded while this one computes: exact across batches too.

    for sample in announce_ahead(batches, models):   # fairseq-eval-lm's loop, wrapped
        ...

A forward pass announces its own experts when it starts; the first hash
layer's experts would then be read while little else computes. fairseq-eval-lm
knows its next batch already (its data iterator holds it), and that batch's
token ids name the experts every hash layer will use for it. So the batches
reach eval-lm through :func:`announce_ahead`, which tells each offloaded
decoder the next batch's token ids before handing over the current one; the
decoder then announces both passes' experts, this one's first (see
``models/hash_layers.py``, ``announce_next``), and the loader reads the next
pass's as the cache frees room. Nothing is guessed: the next batch is the one
eval-lm scores next.

:func:`install_eval_lm_lookahead` wraps ``fairseq_cli.eval_lm.eval_lm`` (called
by its ``main`` by name), once, when the plugin is imported inside
fairseq-eval-lm. It is inert unless a model serves offloaded experts with
``prefetch``.
"""
import functools
import logging
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)


def _prefetching_sides(models):
    sides = []
    for model in models:
        for side in (getattr(model, "decoder", None), getattr(model, "encoder", None)):
            cache = getattr(side, "expert_cache", None)
            if cache is not None and cache.prefetch and hasattr(side, "announce_next"):
                sides.append(side)
    return sides


def announce_ahead(batches: Iterable[dict], models) -> Iterator[dict]:
    """``batches`` as they are, each yielded after the offloaded models were told the
    next one's ``net_input["src_tokens"]``."""
    sides = _prefetching_sides(models)
    if not sides:
        yield from batches
        return
    logger.info("offloaded experts: each next batch's experts are announced ahead")
    batches = iter(batches)
    current = next(batches, None)
    while current is not None:
        following = next(batches, None)
        tokens = (following or {}).get("net_input", {}).get("src_tokens")
        if tokens is not None:
            for side in sides:
                side.announce_next(tokens)
        yield current
        current = following


def install_eval_lm_lookahead():
    """Wrap eval-lm's ``eval_lm`` where fairseq-eval-lm runs: the module is imported
    already when the plugin is (fairseq imports ``--user-dir`` inside its ``main``).
    Never imported here: fairseq_cli's modules point the root logger at stdout on
    import, which would put fairseq's log lines into any program's output."""
    import sys

    modules = [sys.modules.get("fairseq_cli.eval_lm"), sys.modules.get("__main__")]
    for module in modules:  # the console script's module; or ``python -m fairseq_cli.eval_lm``
        spec = getattr(module, "__spec__", None)
        if module is None or getattr(spec, "name", None) != "fairseq_cli.eval_lm":
            continue
        plain = module.eval_lm
        if getattr(plain, "_fairseq_hash", False):
            continue

        @functools.wraps(plain)
        def eval_lm(models, source_dictionary, batch_iterator, *args, plain=plain, **kwargs):
            return plain(models, source_dictionary, announce_ahead(batch_iterator, models),
                         *args, **kwargs)

        eval_lm._fairseq_hash = True
        module.eval_lm = eval_lm
