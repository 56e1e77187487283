"""--optimizer fused_adamw: fairseq's adam update from torch's fused kernel."""
import argparse

import pytest
import torch
from fairseq.optim.adam import Adam

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from fairseq_hash.optim.fused_adamw import FairseqEpsAdamW, FusedAdamW


def params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(300, 70)), torch.nn.Parameter(torch.randn(70))]


def run_steps(optimizer_cls, ps, steps=20, **kwargs):
    opt = optimizer_cls(ps, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in ps:
            # tiny gradients, so that sqrt(v) is near eps and eps's placement shows
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -(5 + i % 3)
        opt.step()
    return ps


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_the_update_equals_fairseqs_adam(weight_decay):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    want = run_steps(Adam, params(), **kwargs)
    got = run_steps(FairseqEpsAdamW, params(), **kwargs)
    plain = run_steps(torch.optim.AdamW, params(), **kwargs)
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert (p - w).abs().max() > 1e-4  # torch's own eps placement differs: the test can tell


def test_the_groups_keep_the_users_eps_and_the_cpu_kernel_is_fused():
    ps = run_steps(FairseqEpsAdamW, params(), steps=3, lr=1e-3, eps=1e-8)
    opt = FairseqEpsAdamW(ps, lr=1e-3, eps=1e-8)
    opt.step()
    assert opt.param_groups[0]["eps"] == 1e-8
    assert opt.param_groups[0]["fused"] is True


def test_flags_are_read_like_fairseqs_adam():
    cfg = argparse.Namespace(lr=[0.003], adam_betas="(0.9, 0.95)", adam_eps=1e-7, weight_decay=0.1)
    opt = FusedAdamW(cfg, params())
    group = opt.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        0.003, (0.9, 0.95), 1e-7, 0.1)


def test_fairseq_train_with_fused_adamw_lowers_the_loss_and_resumes(data_bin, tmp_path):
    train = [a if a != "adam" else "fused_adamw" for a in TINY_TRAIN]
    save = str(tmp_path / "ckpt")
    cmd = [tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL, *train,
           "--save-dir", save, "--weight-decay", "0.01"]
    proc = run(cmd + ["--max-update", "30"])
    log = proc.stdout + proc.stderr
    losses = [row["loss"] for row in json_logs(log, "train_inner")]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 1.0
    proc = run(cmd + ["--max-update", "35"])
    resumed = proc.stdout + proc.stderr
    assert "loaded checkpoint" in resumed.lower()
    assert [row["num_updates"] for row in json_logs(resumed, "train_inner")][-1] == 35


def test_fairseq_hash_help_lists_the_optimizer_flags_beside_the_hash_flags():
    out = " ".join(run([tool("fairseq-hash-help")]).stdout.split())  # unwrapped
    optimizer = out[out.index("--optimizer fused_adamw"):]
    for flag, default in (("--adam-betas", "(0.9, 0.999)"), ("--adam-eps", "1e-8"),
                          ("--weight-decay", "default 0")):
        assert flag in optimizer and default in optimizer
    assert "--hash-experts" in out[:out.index("--optimizer fused_adamw")]
