"""CPU memory: huge pages requested on import, expert gradients reuse their memory."""
import os
import subprocess
import sys

import pytest
import torch

from fairseq_hash.experts import ExpertFFN
from fairseq_hash.huge_pages import THP_ENV, kernel_huge_pages

# In a fresh process: import the plugin before any tensor, as fairseq's
# --user-dir does, then fill a 64 MB tensor and read how much of the process's
# anonymous memory has huge pages.
HUGE_PAGES_AFTER_IMPORT = """
import fairseq_hash, torch
x = torch.empty(16, 1024, 1024).fill_(1)
kb = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(kb[0])
"""


def huge_page_kb(env):
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_AFTER_IMPORT], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(kernel_huge_pages() != "madvise" or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="needs a Linux kernel whose transparent huge pages follow madvise")
def test_importing_the_plugin_gives_large_tensors_huge_pages_unless_the_user_said_0():
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    assert huge_page_kb(env) >= 32 * 1024
    assert huge_page_kb(dict(env, **{THP_ENV: "0"})) == 0


def step(experts, x, counts):
    experts.zero_grad(set_to_none=True)  # as fairseq does after every update
    experts(x, counts).pow(2).sum().backward()
    return [p.grad for p in (experts.fc1_weight, experts.fc2_weight)]


def test_expert_weight_gradients_reuse_last_steps_memory_once_it_is_dropped():
    torch.manual_seed(0)
    experts = ExpertFFN(4, 8, 16)
    x, counts = torch.randn(10, 8), [3, 0, 4, 3]
    first = step(experts, x, counts)
    addresses, values = [g.data_ptr() for g in first], [g.clone() for g in first]
    del first
    second = step(experts, x, counts)
    assert [g.data_ptr() for g in second] == addresses
    for g, want in zip(second, values):
        assert torch.equal(g, want)
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # the idle expert, not last step's memory


def test_a_gradient_someone_kept_is_never_overwritten():
    torch.manual_seed(0)
    experts = ExpertFFN(4, 8, 16)
    x, counts = torch.randn(10, 8), [3, 2, 4, 1]
    kept = step(experts, x, counts)
    values = [g.clone() for g in kept]
    x2 = torch.randn(10, 8)
    new = step(experts, x2, counts)
    for g, old, want in zip(new, kept, values):
        assert g.data_ptr() != old.data_ptr()
        assert torch.equal(old, want)
        assert not torch.equal(g, want)


def test_gradients_accumulate_over_two_backwards_without_zeroing():
    torch.manual_seed(0)
    experts = ExpertFFN(4, 8, 16)
    x, counts = torch.randn(10, 8), [3, 2, 4, 1]
    once = [g.clone() for g in step(experts, x, counts)]
    experts(x, counts).pow(2).sum().backward()  # update_freq 2: no zero_grad between
    for g, want in zip((experts.fc1_weight.grad, experts.fc2_weight.grad), once):
        torch.testing.assert_close(g, 2 * want)
