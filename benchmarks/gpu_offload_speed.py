"""Offloaded experts on one CUDA device: scoring speed and device memory against all resident.

    python benchmarks/gpu_offload_speed.py [--experts 16] [--embed-dim 1024] [--ffn-dim 4096]
        [--dtype bfloat16] [--json FILE]

Builds an untrained hash LM (4 layers, hash layers 1 and 3) with
``fairseq_hash.cli.bench.offload``'s helpers, loads it through the hub interface
onto the GPU once per row, and times the forward pass of batches of
``--batch`` x 256 tokens (after two warm-up batches, with the device
synchronised): all resident; offloaded on demand; offloaded with exact
prefetch, with a cache of half the experts and of all of them. Offloaded
experts sit in pinned host memory and are copied on the loader's side stream
(``fairseq_hash/offload/cuda.py``). Prints a table: tokens/s, the peak of
device memory while scoring, the cache's peak, and the experts' bytes loaded
(counted as stored in the checkpoint, fp32; each copy to the device carries the
model's dtype). Run by ``benchmarks/gpu_check.sh``; needs a CUDA device.
"""
import argparse
import gc
import json
import logging
import os
import tempfile
import time

import torch


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=16, help="experts a hash layer (default 16)")
    parser.add_argument("--embed-dim", type=int, default=1024, help="d (default 1024)")
    parser.add_argument("--ffn-dim", type=int, default=4096, help="f of every expert (default 4096)")
    parser.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens a batch")
    parser.add_argument("--batches", type=int, default=10, help="timed batches (default 10)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="the model's dtype on the device (default bfloat16)")
    parser.add_argument("--device", default="cuda",
                        help="torch device (default cuda; cpu runs the script's logic only)")
    parser.add_argument("--workdir", help="folder for data and the checkpoint (default: temporary)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    opts = parser.parse_args(argv)
    logging.disable(logging.INFO)  # fairseq logs the whole config at every load
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from fairseq_hash.cli.bench.offload import model_flags, save_untrained_checkpoint, write_data

    work = opts.workdir or tempfile.mkdtemp(prefix="gpu_offload_")
    data = write_data(work)
    shape = argparse.Namespace(layers=4, hash_layers=2, embed_dim=opts.embed_dim,
                               ffn_dim=opts.ffn_dim, experts=opts.experts)
    ckpt = save_untrained_checkpoint(os.path.join(work, "hash.pt"), model_flags(data, shape, "hash"))
    dtype = getattr(torch, opts.dtype)
    k = opts.experts
    rows = [("all resident", {}), ("on demand, cache K", dict(hash_offload_experts="demand",
                                                              hash_expert_cache=str(k))),
            ("exact prefetch, cache K", dict(hash_offload_experts="prefetch",
                                             hash_expert_cache=str(k))),
            ("exact prefetch, cache 2K", dict(hash_offload_experts="prefetch",
                                              hash_expert_cache=str(2 * k)))]
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"{opts.dtype}, 2 hash layers x {k} experts, d={opts.embed_dim}, f={opts.ffn_dim}, "
          f"batches of {opts.batch}x256 tokens, {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print("| model | tokens/s | device peak MB | cache peak MB | "
          "expert MB loaded (as stored; warm-up included) |")
    print("|---|---:|---:|---:|---:|", flush=True)
    for name, overrides in rows:
        lm = TransformerLanguageModel.from_pretrained(work, "hash.pt", data, **overrides).eval()
        lm = lm.to(device).to(dtype)
        vocab = len(lm.task.dictionary)
        batches = [torch.randint(4, vocab, (opts.batch, 256), generator=gen).to(device)
                   for _ in range(opts.batches + 2)]
        cache = lm.models[0].decoder.expert_cache  # None when all resident
        stats = cache.stats if cache is not None else {}
        with torch.no_grad():
            for b in batches[:2]:
                lm.models[0](b)
            sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for b in batches[2:]:
                lm.models[0](b)
            sync(cuda)
            seconds = time.perf_counter() - start
        row = dict(model=name, tokens_per_s=opts.batches * opts.batch * 256 / seconds,
                   device_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else 0,
                   cache_peak_mb=stats.get("peak_bytes", 0) / 2**20,
                   copied_mb=stats.get("bytes_read", 0) / 2**20)
        results.append(row)
        print(f"| {name} | {row['tokens_per_s']:.0f} | {row['device_peak_mb']:.0f} | "
              f"{row['cache_peak_mb']:.0f} | {row['copied_mb']:.0f} |", flush=True)
        del lm, batches
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=opts.dtype,
                           experts=k, embed_dim=opts.embed_dim, ffn_dim=opts.ffn_dim,
                           rows=results), f, indent=1)


if __name__ == "__main__":
    main()
