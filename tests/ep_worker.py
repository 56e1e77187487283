"""One rank of a 2-process gloo check, run by tests/test_expert_parallel.py.

    python tests/ep_worker.py RANK WORLD PORT CASE OUT

Each rank builds the same MoE layer (experts spread over the ranks as
fairseq-train would spread them), runs its own tokens forward and backward,
and saves what it computed to OUT.RANK.pt for the test to compare.
"""
import sys

import torch
import torch.distributed as dist


def layer_spec(router, dispatch, parallel_size):
    from fairseq_hash.spec import HashLayerSpec

    return HashLayerSpec(total_experts=4, hash_type="random", router=router,
                         parallel_size=parallel_size, dispatch=dispatch)


def tokens_of(rank, S=24, d=8):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(S, d, generator=gen), torch.randint(4, 30, (1, S), generator=gen)


def main():
    rank, world, port, case, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from fairseq.data import Dictionary

    from fairseq_hash.hashing import RouteInputs
    from fairseq_hash.moe_factory import build_hash_moe

    dictionary = Dictionary()
    for i in range(30):
        dictionary.add_symbol(f"w{i}")
    torch.manual_seed(0)
    case, _, dtype = case.partition(":")  # "fairscale:bfloat16": the layer in bf16
    dtype = getattr(torch, dtype or "float32")
    router, dispatch, steps = {"hash": ("hash", "alltoall", 1), "top2": ("top2", "alltoall", 1),
                               "fairscale": ("hash", "fairscale", 1),
                               "fairscale-top2": ("top2", "fairscale", 1),
                               "exact": ("hash", "alltoall-exact", 1),
                               "exact-top2": ("top2", "alltoall-exact", 1),
                               "replicas": ("hash", "alltoall", 3)}[case]
    moe = build_hash_moe(layer_spec(router, dispatch, 1 if case == "replicas" else 0),
                         dictionary, 0, 8, 16).to(dtype)
    moe.eval()  # learned routers: no capacity, no noise, so every path routes alike
    for step in range(steps):
        x, tokens = tokens_of(rank + 2 * step)
        x = x.to(dtype).requires_grad_()
        route = RouteInputs.from_tokens(tokens, dictionary.pad(), dictionary.eos())
        y = moe(x.unsqueeze(1), route).squeeze(1)  # [T, B=1, d] as fairseq's layers see it
        (y * torch.arange(1.0, 9.0, dtype=dtype)).sum().backward()
        with torch.no_grad():
            for p in moe.experts.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    torch.save({"x": x.detach(), "tokens": tokens, "y": y.detach(), "x_grad": x.grad,
                "experts": {k: v.detach() for k, v in moe.experts.state_dict().items()},
                "first": moe.experts.first_expert, "router": moe.router.state_dict()},
               f"{out}.{rank}.pt")
    # no rank tears its connections down while another still finishes its last
    # exchange (gloo then aborts the other: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
