"""fairseq-train whose rank 1 runs out of memory in a training step, for tests/test_ep_guards.py.

    python tests/ep_oom_worker.py FAIRSEQ-TRAIN-FLAGS... --distributed-rank R

The error is raised by hand from rank 1's third call of the experts, as
torch raises a CUDA out-of-memory error: fairseq tells one from its message.
"""
import sys

sys.argv[0] = "fairseq-train"  # one of fairseq's tools: our one-line errors

from fairseq_hash.experts import ExpertFFN  # noqa: E402

RANK = int(sys.argv[sys.argv.index("--distributed-rank") + 1])
calls = 0
forward = ExpertFFN.forward


def forward_or_oom(self, x, counts):
    global calls
    calls += 1
    if RANK == 1 and calls == 3:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")
    return forward(self, x, counts)


ExpertFFN.forward = forward_or_oom

if __name__ == "__main__":
    from fairseq_cli.train import cli_main

    cli_main()
