"""Learned-routing baselines (switch, top2, base) beside hash routing, and their loss."""
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_hash.cli.user_dir import user_dir
from fairseq_hash.experts import ExpertFFN
from fairseq_hash.moe_layer import MoELayer
from fairseq_hash.routers import BaseRouter, SwitchRouter, Top2Router, greedy_balanced_assignment

LEARNED = {
    "switch": lambda d, k: SwitchRouter(d, k),
    "top2": lambda d, k: Top2Router(d, k),
    "base": lambda d, k: BaseRouter(d, k),
}


def build(data_bin, router, criterion="moe_cross_entropy", *extra):
    """A tiny LM (both layers routed), its task and criterion, built in this process."""
    argv = [data_bin, "--user-dir", user_dir(), "--task", "language_modeling",
            "--arch", "hash_transformer_lm", "--decoder-layers", "2",
            "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "2", "--hash-experts", "4", "--hash-layer", "0,1",
            "--router", router, "--tokens-per-sample", "32", "--max-tokens", "512",
            "--criterion", criterion, "--dropout", "0", "--seed", "3", "--cpu", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(3)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    crit = task.build_criterion(cfg.criterion)
    task.load_dataset("train")
    batch = next(iter(task.get_batch_iterator(
        task.dataset("train"), max_tokens=512).next_epoch_itr(shuffle=False)))
    return model, crit, batch


def train_steps(model, crit, batch, steps=8):
    """Adam on one batch; returns the logging outputs of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    logs = []
    for _ in range(steps):
        opt.zero_grad()
        loss, sample_size, log = crit(model, batch)
        (loss / sample_size).backward()
        opt.step()
        logs.append(log)
    return logs


@pytest.mark.parametrize("router", ["hash", "switch", "top2", "base"])
def test_each_router_trains_and_its_loss_falls(data_bin, router):
    model, crit, batch = build(data_bin, router)
    logs = train_steps(model, crit, batch)
    first, last = float(logs[0]["loss"]), float(logs[-1]["loss"])
    assert last < 0.85 * first, (router, first, last)


@pytest.mark.parametrize("router,positive", [("switch", True), ("top2", True),
                                             ("hash", False), ("base", False)])
def test_aux_loss_is_positive_for_switch_and_top2_and_zero_for_hash(data_bin, router, positive):
    model, crit, batch = build(data_bin, router)
    log = train_steps(model, crit, batch, steps=1)[0]
    if positive:
        # two routed layers, each about 1 at perfect balance
        assert log["moe_aux_loss"] > 0
    else:
        assert log["moe_aux_loss"] == 0
        assert log["moe_dropped"] == 0
    assert log["moe_slots"] > 0


def test_learned_router_gradients_reach_the_gate(data_bin):
    model, crit, batch = build(data_bin, "switch")
    loss, sample_size, _ = crit(model, batch)
    loss.backward()
    gate = model.decoder.moe_layers[0].router.wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert not getattr(gate, "expert", False)  # shared, all-reduced like any weight


def test_plain_cross_entropy_still_works_with_hash_routing(data_bin):
    model, crit, batch = build(data_bin, "hash", "cross_entropy")
    loss, sample_size, log = crit(model, batch)
    assert torch.isfinite(loss) and "moe_aux_loss" not in log


def test_switch_counts_dropped_tokens_when_capacity_is_small():
    torch.manual_seed(0)
    router = SwitchRouter(16, 4, capacity_factor=0.5)
    moe = MoELayer(router, ExpertFFN(4, 16, 32)).train()
    x = torch.randn(64, 16)
    moe(x)
    out = router(x)
    kept = out.indices[~out.dropped]
    # capacity 0.5 * 64 / 4 = 8 tokens an expert: at least half of the tokens are dropped
    assert torch.bincount(kept, minlength=4).max() <= 8
    assert moe.num_dropped == int(out.dropped.sum()) >= 32
    router.capacity_factor = 4.0
    moe(x)
    assert moe.num_dropped == 0


def test_dropped_tokens_pass_through_as_zero_ffn_output():
    torch.manual_seed(0)
    moe = MoELayer(SwitchRouter(8, 2, capacity_factor=0.25), ExpertFFN(2, 8, 16)).train()
    x = torch.randn(16, 8)
    y = moe(x)
    dropped = moe.router(x).dropped[:, 0]
    assert dropped.any() and torch.all(y[dropped] == 0) and torch.all(y[~dropped].abs().sum(-1) > 0)


@pytest.mark.parametrize("S", [64, 1024])
@pytest.mark.parametrize("K", [4, 16])
def test_base_gives_every_expert_exactly_S_over_K_tokens(S, K):
    torch.manual_seed(0)
    router = BaseRouter(32, K).train()
    out = router(torch.randn(S, 32) + 3 * torch.randn(1, 32))  # skewed: most prefer one
    assert torch.bincount(out.indices[:, 0], minlength=K).tolist() == [S // K] * K


def test_base_balances_within_one_when_K_does_not_divide_S():
    torch.manual_seed(0)
    out = BaseRouter(32, 4).train()(torch.randn(66, 32))
    load = torch.bincount(out.indices[:, 0], minlength=4)
    assert load.sum() == 66 and load.max() - load.min() <= 1


def test_base_fallback_assignment_is_balanced():
    scores = torch.randn(40, 4)
    order = greedy_balanced_assignment(scores)
    assert sorted(order.tolist()) == list(range(40))
    expert = torch.empty(40, dtype=torch.long)
    expert[order] = torch.arange(40) // 10
    # every token is in its expert's block, and the best-scoring pair is honoured
    best = int(torch.argmax(scores))
    assert expert[best // 4] == best % 4


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_learned_routers_route_deterministically_at_evaluation(name):
    torch.manual_seed(0)
    router = LEARNED[name](32, 8).eval()
    x = torch.randn(100, 32)  # 100: not a multiple of K, as a last batch may be
    a, b = router(x), router(x)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.weights, b.weights)
    assert a.dropped is None or not a.dropped.any()  # nothing dropped at evaluation


@pytest.mark.parametrize("router", ["hash", "switch", "top2", "base"])
def test_model_evaluation_is_deterministic(data_bin, router):
    model, crit, batch = build(data_bin, router)
    train_steps(model, crit, batch, steps=1)  # routes learned, not only initial
    model.eval()
    with torch.no_grad():
        first = model(**batch["net_input"])[0]
        routes = [m.last_indices.clone() for m in model.decoder.moe_layers.values()]
        second = model(**batch["net_input"])[0]
    assert torch.equal(first, second)
    assert all(torch.equal(r, m.last_indices) for r, m in zip(routes, model.decoder.moe_layers.values()))


def test_top2_sends_each_token_to_two_different_experts():
    torch.manual_seed(0)
    out = Top2Router(16, 4).train()(torch.randn(50, 16))
    kept = ~out.dropped
    both = kept.all(dim=1)
    assert torch.all(out.indices[both, 0] != out.indices[both, 1])
    assert torch.allclose(out.weights[both].sum(-1), torch.ones(int(both.sum())))


def test_unknown_router_is_a_one_line_error(data_bin):
    from fairseq_hash.errors import HashConfigError

    with pytest.raises(HashConfigError, match="--router 'gshard'.*valid: hash, switch, top2, base"):
        build(data_bin, "gshard")
