"""One rank of a 2-process gloo check of ExpertGradientSync (tests/test_gradient_sync.py).

    python tests/ep_sync_worker.py RANK WORLD PORT CASE OUT

CASE "once"/"every": 2 micro-batches an update, the first under ``no_sync``
("once") or not ("every"); "overflow": rank 1's expert gradient is inf.
Saves the gradients and the number of all-reduces to OUT.RANK.pt.
"""
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn


def main():
    rank, world, port, case, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from fairseq.data import Dictionary

    from ep_worker import layer_spec, tokens_of
    from fairseq_hash.expert_parallel import ExpertGradientSync
    from fairseq_hash.hashing import RouteInputs
    from fairseq_hash.moe_factory import build_hash_moe

    reduces = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        reduces.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    dictionary = Dictionary()
    for i in range(30):
        dictionary.add_symbol(f"w{i}")
    torch.manual_seed(0)
    replicas = case in ("once", "every")  # P = 1: every expert on both ranks
    moe = build_hash_moe(layer_spec("hash", "alltoall", 1 if replicas else 0), dictionary, 0,
                         8, 16, sync_gradients=False)
    embed = nn.Linear(8, 8)  # a shared parameter in front of the layer: the anchor
    sync = ExpertGradientSync(moe.layout)
    sync.register(moe.experts.parameters())
    sync.set_anchor(embed.weight)
    if case == "overflow" and rank == 1:
        moe.experts.fc1_weight.register_hook(lambda g: g * float("inf"))
    for micro_batch in range(1 if case == "overflow" else 2):
        x, tokens = tokens_of(rank + 2 * micro_batch)
        route = RouteInputs.from_tokens(tokens, dictionary.pad(), dictionary.eos())
        accumulate = sync.no_sync() if case == "once" and micro_batch == 0 else nullcontext()
        with accumulate:
            sync.begin()
            y = moe(embed(x).unsqueeze(1), route).squeeze(1)
            (y * torch.arange(1.0, 9.0)).sum().backward()
    torch.save({"grads": {k: p.grad for k, p in moe.experts.named_parameters()},
                "anchor": embed.weight.grad, "bias": embed.bias.grad, "reduces": reduces},
               f"{out}.{rank}.pt")
    dist.barrier()  # as in ep_worker.py: no rank leaves while another still exchanges
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
