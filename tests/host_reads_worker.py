"""One of 2 gloo ranks of tests/test_host_reads.py: a hash LM with its experts spread
over both ranks takes a training step under HostReads.

    python tests/host_reads_worker.py RANK PORT DATA_BIN OUT
"""
import sys

import torch
import torch.distributed as dist


def main():
    rank, port, data_bin, out = sys.argv[1:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank),
                            world_size=2)
    from conftest import TINY_MODEL
    from host_reads import HostReads, training_step
    from models_util import build_in_process

    model, task = build_in_process([data_bin, *TINY_MODEL, "--dropout", "0",
                                    "--ddp-backend", "legacy_ddp"])
    assert model.decoder.moe_layers[0].exchange is not None  # two experts a rank
    model.train()
    torch.manual_seed(int(rank))
    tokens = torch.randint(4, len(task.dictionary), (2, 16))
    tokens[0, 12:] = task.dictionary.pad()
    with HostReads() as reads:
        training_step(model, tokens)
    torch.save({"inside": reads.inside, "planned": len(reads.planned), "all": reads.reads},
               f"{out}.{rank}.pt")
    dist.barrier()  # as in ep_worker.py: no rank leaves while another still exchanges
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
