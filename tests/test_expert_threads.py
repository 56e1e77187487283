"""CPU expert groups: a fixed pool, a share of the threads each, the process's count kept."""
import threading

import pytest
import torch

from fairseq_hash import expert_threads
from fairseq_hash.expert_threads import for_expert_groups
from fairseq_hash.experts import ExpertFFN


@pytest.fixture
def four_threads(monkeypatch):
    """The process runs 4 intra-op threads; a fresh pool of expert workers."""
    monkeypatch.delenv("FAIRSEQ_HASH_EXPERT_THREADS", raising=False)
    monkeypatch.setattr(expert_threads, "_POOL", None)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def threads_of_a_new_thread():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_started_after_forward_and_backward_sees_the_process_thread_count(four_threads):
    torch.manual_seed(0)
    ffn = ExpertFFN(4, 8, 16)
    x = torch.randn(20, 8, requires_grad=True)
    ffn(x, [6, 4, 0, 10]).sum().backward()
    assert torch.get_num_threads() == 4
    assert threads_of_a_new_thread() == 4


def test_each_group_computes_with_its_share_of_the_threads(four_threads):
    shares = []
    for_expert_groups(torch.device("cpu"), [5, 0, 5, 5],
                      lambda group: shares.append((len(group), torch.get_num_threads())))
    assert sorted(shares) == [(1, 1), (1, 1), (1, 2)]  # 3 groups of one expert share 4 threads
    shares.clear()
    for_expert_groups(torch.device("cpu"), [5, 0, 0, 5],
                      lambda group: shares.append((len(group), torch.get_num_threads())))
    assert shares == [(1, 2), (1, 2)]


def test_decoding_steps_with_varying_experts_build_no_new_pool(four_threads, monkeypatch):
    built = []

    class CountedPool(expert_threads.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(expert_threads, "ThreadPoolExecutor", CountedPool)
    torch.manual_seed(0)
    ffn = ExpertFFN(8, 8, 16).eval()
    # one token a sentence of a beam: 1 to 4 experts receive tokens, step after step
    for counts in ([1, 0, 1, 0, 0, 0, 0, 1], [0, 2, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
                   [0, 0, 0, 3, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 1, 1]):
        with torch.no_grad():
            ffn(torch.randn(sum(counts), 8), counts)
    assert len(built) == 1
