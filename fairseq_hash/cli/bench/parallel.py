"""``fairseq-hash-bench --ranks W``: expert parallelism on W = 2 or 4 gloo processes.

    fairseq-hash-bench --ranks 2 --experts 16 --tokens 4096     # the layer
    fairseq-hash-bench --ranks 4 --train --experts 16           # fairseq-train, 4 ranks
    fairseq-hash-bench --ranks 2 --counts                       # exchange sizes

``--counts`` times what the decoder does before its layers run (one all-gather
of every hash layer's per-expert counts) against one all-gather a layer.

The layer mode times one hash layer's forward and backward (d=512, f=2048), each
of W gloo ranks holding K/W experts and its own S tokens (uniformly random
experts), with the default exchange (``alltoall``, every block padded to the
largest), the exact one (``alltoall-exact``, no padding) and fairscale's
``MOELayer`` (``fairscale``), against the same layer on one process over the
same WS tokens with all K experts. It prints the time per step, the rows and
bytes each rank sends per step (forward and backward, both directions), and
the rows its tokens need (the same without padding).

``--wire`` counts the rows the exchange moves at sizes this machine cannot run
(P = 2, 4, 8 ranks, 4096 and 16384 tokens a rank, K = 64): token ids drawn from
a Zipf vocabulary of 32000 symbols, routed by a balanced hash of their
expected counts, right-padded rows making up 0, 10 or 25% of a batch
(``--repeat`` batches a row). It prints, per step and summed over ranks, the
rows with a token, and the rows fairscale's padded all-to-all sends with
padding positions sent to expert 0 (before) and sent nowhere (now); the exact
exchange (``--moe-dispatch alltoall-exact``) sends the rows with a token.

``--train`` runs ``fairseq-train`` on W gloo ranks (launched by hand, as
docs/several-workers.md shows): the hash LM expert-parallel, and the dense
``transformer_lm`` data-parallel on the same global batch, and prints
fairseq's words/s of each.
On N GPUs, the same comparison is ``fairseq-train ... --distributed-world-size
N`` with and without ``--arch hash_transformer_lm`` (BENCHMARKS.md).
"""
import json
import os
import socket
import subprocess
import sys
import time

import torch

from ...errors import HashConfigError
from ..user_dir import user_dir
from .options import prepared_data

SELF = [sys.executable, "-m", "fairseq_hash.cli.bench.parallel"]  # a worker rank


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_worker(rank, world, port, experts, tokens, dispatch, repeat, out):
    import torch.distributed as dist
    from fairseq_hash.expert_parallel import AllToAllExchange, expert_layout
    from fairseq_hash.experts import ExpertFFN
    from fairseq_hash.fairscale_dispatch import FairscaleExchange
    from fairseq_hash.moe_layer import MoELayer
    from fairseq_hash.routers import RouterOutput

    class Fixed(torch.nn.Module):
        def forward(self, x, route):
            return RouterOutput(indices=self.indices)

    torch.set_num_threads(1)  # one core a rank, as the two ranks share 2 cores
    d, f = 512, 2048
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        layout = expert_layout(world)  # P = W: W divides K here
        ffn = ExpertFFN(experts, d, f, shard=layout.shard, num_shards=layout.parallel_size)
        exchange = (FairscaleExchange(layout, ffn) if dispatch == "fairscale"
                    else AllToAllExchange(layout, exact=dispatch == "alltoall-exact"))
    else:
        ffn, exchange = ExpertFFN(experts, d, f), None
    router = Fixed()
    moe = MoELayer(router, ffn, exchange)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, d, generator=gen, requires_grad=True)
    router.indices = torch.randint(experts, (tokens, 1), generator=gen)
    times, sent, needed = [], 0, 0
    for step in range(repeat + 1):
        start = time.perf_counter()
        moe(x).sum().backward()
        if step:
            times.append(time.perf_counter() - start)
    if world > 1:
        counts = torch.bincount(router.indices.view(-1), minlength=experts)
        everyone = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(everyone, counts)
        pair = torch.stack(everyone).view(world, world, -1).sum(-1)
        capacity = int(pair.max())  # rows of each block of the padded exchange
        sent = 4 * world * capacity  # forward there and back, and the same in backward
        needed = 4 * int(pair[rank].sum())
        if dispatch == "alltoall-exact":
            sent = needed  # exact split sizes: no padding rows
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"seconds": sorted(times)[len(times) // 2], "rows_sent": sent,
                   "rows_needed": needed}, fh)


def counts_worker(rank, world, port, experts, layers, repeat, out):
    """Time gathering every hash layer's counts at once against once per layer."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    counts = torch.zeros(layers, experts, dtype=torch.long)
    result = {}
    for name, parts in (("one gather for all layers", [counts]),
                        ("one gather a layer", list(counts))):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeat):
            for part in parts:
                everyone = [torch.empty_like(part) for _ in range(world)]
                dist.all_gather(everyone, part)
        result[name] = 1e6 * (time.perf_counter() - start) / repeat
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(result, fh)


def run_counts(args):
    port, out = free_port(), f"/tmp/ep-counts-{os.getpid()}"
    procs = [subprocess.Popen([*SELF, "_counts", str(r), str(args.ranks), str(port),
                               str(args.experts), str(args.layers), "200", out])
             for r in range(args.ranks)]
    if any(p.wait() for p in procs):
        raise HashConfigError(f"--ranks {args.ranks} --counts: a worker process failed (its "
                              f"error is above)")
    result = json.load(open(f"{out}.0"))
    print(f"| exchange sizes of {args.layers} hash layers, K={args.experts} | us a forward |")
    print("|---|---:|")
    for name, us in result.items():
        print(f"| {name} | {us:.0f} |")
    return [{"setting": k, "us": v, "layers": args.layers} for k, v in result.items()]


def run_layer(args):
    rows, W = [], args.ranks
    for name, world, tokens, dispatch in (
            ("1 process, all experts", 1, W * args.tokens, "alltoall"),
            (f"{W} ranks, alltoall", W, args.tokens, "alltoall"),
            (f"{W} ranks, alltoall-exact", W, args.tokens, "alltoall-exact"),
            (f"{W} ranks, fairscale MOELayer", W, args.tokens, "fairscale")):
        port, out = free_port(), f"/tmp/ep-bench-{os.getpid()}"
        procs = [subprocess.Popen([*SELF, "_layer", str(r), str(world),
                                   str(port), str(args.experts), str(tokens), dispatch,
                                   str(args.repeat), out]) for r in range(world)]
        for p in procs:
            if p.wait():
                raise HashConfigError(f"--ranks {W}: the {name} worker failed (its error is "
                                      f"above)")
        result = [json.load(open(f"{out}.{r}")) for r in range(world)]
        seconds = max(r["seconds"] for r in result)
        rows.append({"setting": name, "experts": args.experts, "tokens_per_step": W * args.tokens,
                     "ms": 1000 * seconds, "rows_sent_per_rank": result[0]["rows_sent"],
                     "rows_needed_per_rank": result[0]["rows_needed"],
                     "mb_sent_per_rank": result[0]["rows_sent"] * 512 * 4 / 2**20})
    print("| setting | K | tokens a step | fwd+bwd ms | rows sent a rank | rows needed a rank "
          "| MB sent a rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['experts']} | {r['tokens_per_step']} | {r['ms']:.1f} | "
              f"{r['rows_sent_per_rank']} | {r['rows_needed_per_rank']} | "
              f"{r['mb_sent_per_rank']:.1f} |")
    return rows


def fairseq_words_per_second(args, arch_flags, port):
    """fairseq's words/s of one run on --ranks gloo ranks launched by hand."""
    base = [args.data_bin, "--task", "language_modeling", "--user-dir", user_dir(),
            "--decoder-layers", "4", "--decoder-embed-dim", "256",
            "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
            "--tokens-per-sample", "128", "--max-tokens", str(args.train_tokens),
            "--optimizer", "adam", "--lr", "0.0005", "--max-update", str(args.updates),
            "--cpu", "--num-workers", "0", "--log-format", "json", "--log-interval", "2",
            "--no-save", "--disable-validation", "--distributed-world-size", str(args.ranks),
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            *arch_flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    tool = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    others = [subprocess.Popen([tool, *base, "--distributed-rank", str(rank)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for rank in range(1, args.ranks)]
    first = subprocess.run([tool, *base, "--distributed-rank", "0"], env=env,
                           capture_output=True, text=True)
    for other in others:
        other.wait()
    wps = [float(json.loads(line[line.index("{"):])["wps"])
           for line in (first.stdout + first.stderr).splitlines()
           if "| train_inner |" in line]
    if not wps:
        last = first.stderr.strip().splitlines()[-1:] or ["no output"]
        raise HashConfigError(f"--ranks {args.ranks} --train: fairseq-train failed: {last[0]}")
    return sum(wps[1:]) / max(len(wps) - 1, 1)  # the first interval includes start-up


def run_train(args):
    args.data_bin = prepared_data(args)
    hash_flags = ["--arch", "hash_transformer_lm", "--hash-layer", "-1",
                  "--hash-experts", str(args.experts)]
    rows = [{"model": "dense, data-parallel", "wps": fairseq_words_per_second(
                args, ["--arch", "transformer_lm"], free_port())},
            {"model": f"hash K={args.experts}, expert-parallel", "wps": fairseq_words_per_second(
                args, hash_flags, free_port())}]
    print(f"| model ({args.ranks} gloo ranks) | words/s | vs dense |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['wps']:.0f} | {r['wps'] / rows[0]['wps']:.2f}x |")
    return rows


def padded_rows(experts: torch.Tensor, total_experts: int, ranks: int) -> int:
    """Rows of fairscale's padded all-to-all, summed over ranks, one direction:
    ``experts [P, S]`` (id ``total_experts``: goes nowhere) -> P * P * C."""
    counts = torch.stack([torch.bincount(e, minlength=total_experts + 1)[:total_experts]
                          for e in experts])  # [P, K]
    pair = counts.view(ranks, ranks, -1).sum(-1)  # [src, dst]
    return ranks * ranks * int(pair.max())


def run_wire(args, vocab=32000, total_experts=64):
    from ...hashing import greedy_balance

    draws = args.repeat  # batches drawn for each row
    gen = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)  # Zipf, exponent 1
    probs /= probs.sum()
    table = greedy_balance(probs * 1e9, total_experts)  # the balanced hash of these counts
    rows = []
    for ranks in (2, 4, 8):
        for tokens in (4096, 16384):
            for pad_share in (0.0, 0.1, 0.25):
                needed = before = now = 0
                for _ in range(draws):
                    ids = torch.multinomial(probs, ranks * tokens, replacement=True,
                                            generator=gen).view(ranks, tokens)
                    experts = table[ids]
                    # right padding: the last pad_share of each 512-token row
                    pad = (torch.arange(tokens) % 512) >= round(512 * (1 - pad_share))
                    pad = pad.expand(ranks, tokens)
                    needed += int((~pad).sum())
                    before += padded_rows(experts.masked_fill(pad, 0), total_experts, ranks)
                    now += padded_rows(experts.masked_fill(pad, total_experts), total_experts,
                                       ranks)
                rows.append({"ranks": ranks, "tokens_per_rank": tokens, "padding": pad_share,
                             "rows_needed": needed / draws, "padded_before": before / draws,
                             "padded_now": now / draws, "exact": needed / draws})
    print(f"| P | tokens a rank | padding | rows with a token | padded all-to-all, padding "
          f"to expert 0 (before) | padded all-to-all, padding nowhere (now) | exact split |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r["rows_needed"]
        print(f"| {r['ranks']} | {r['tokens_per_rank']} | {r['padding']:.0%} | {n:.0f} | "
              f"{r['padded_before']:.0f} (+{r['padded_before'] / n - 1:.1%}) | "
              f"{r['padded_now']:.0f} (+{r['padded_now'] / n - 1:.1%}) | {n:.0f} (+0%) |")
    return rows


def run_ranks(args) -> list:
    """The --ranks 2 and 4 modes of fairseq-hash-bench; ``args`` are its parsed flags."""
    if args.ranks not in (2, 4):
        raise HashConfigError(f"--ranks {args.ranks}: supports 2 and 4 (gloo processes on this "
                              f"machine); for N GPUs see BENCHMARKS.md")
    if args.experts[0] % args.ranks:
        raise HashConfigError(f"--experts {args.experts[0]} with --ranks {args.ranks}: the "
                              f"ranks must divide the experts")
    args.experts, args.tokens = args.experts[0], (args.tokens or [4096])[0]
    if args.wire:
        return run_wire(args)
    if args.counts:
        return run_counts(args)
    return run_train(args) if args.train else run_layer(args)


def worker_main(argv):
    mode, a = argv[0], argv[1:]
    if mode == "_counts":
        counts_worker(int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6])
    else:
        layer_worker(int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5], int(a[6]),
                     a[7])


if __name__ == "__main__":
    worker_main(sys.argv[1:])
