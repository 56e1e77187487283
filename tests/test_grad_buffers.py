"""CPU memory: expert weight gradients reuse their memory, and nothing kept is overwritten."""
import torch

from fairseq_hash.experts import ExpertFFN


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


def test_without_torchs_storage_use_count_every_backward_gets_fresh_memory(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    torch.manual_seed(0)
    experts = ExpertFFN(4, 8, 16)
    x, counts = torch.randn(10, 8), [3, 2, 4, 1]
    first = step(experts, x, counts)
    kept = [g.clone() for g in first]
    del first  # free to reuse, had torch said so
    second = step(experts, x, counts)
    assert not hasattr(experts.fc1_weight, "_fairseq_hash_grad")  # nothing kept aside
    for g, want in zip(second, kept):
        assert torch.equal(g, want)
