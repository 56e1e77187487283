"""fairseq's --store-ema on hash models: integer buffers copied, weights averaged, and the
average written as a checkpoint that fairseq's tools score (fairseq-hash-consolidate --ema)."""
import os

import pytest
import torch
import torch.nn as nn

import fairseq_hash  # noqa: F401  (installs the EMA fix)
from conftest import TINY_MODEL, TINY_TRAIN, run, tool, user_dir

EMA = ["--store-ema", "--ema-decay", "0.9"]


def test_fairseq_ema_copies_integer_buffers_and_averages_the_weights():
    from fairseq.dataclass.configs import EMAConfig
    from fairseq.models.ema import EMA as FairseqEMA

    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.arange(4))
    ema = FairseqEMA(model, EMAConfig(store_ema=True, ema_decay=0.5))
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.table.add_(1)
    ema.step(model)  # fairseq alone: "result type Float can't be cast to ... Long"
    assert torch.equal(ema.get_model().table, model.table)
    assert torch.allclose(ema.get_model().weight, before + 0.5)


def train(data_bin, save, *extra, updates):
    return run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, *EMA, "--max-update", str(updates), "--save-dir", save, *extra])


def eval_loss(data_bin, path):
    proc = run([tool("fairseq-eval-lm"), data_bin, "--path", path, "--user-dir", user_dir(),
                "--cpu", "--gen-subset", "valid", "--max-tokens", "512", "--tokens-per-sample", "32"])
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "Loss (base 2)" in l)
    return float(line.split("Loss (base 2):")[1].split(",")[0])


@pytest.mark.parametrize("fp32", [False, True], ids=["ema", "ema-fp32"])
def test_a_hash_lm_trains_resumes_and_scores_its_ema_weights(data_bin, tmp_path, fp32):
    from fairseq import checkpoint_utils

    save = str(tmp_path / "ckpt")
    extra = ["--ema-fp32"] if fp32 else []
    train(data_bin, save, *extra, updates=5)
    resumed = train(data_bin, save, *extra, updates=8)  # the EMA comes back from the file
    assert "Loading EMA from checkpoint" in resumed.stdout + resumed.stderr
    last = os.path.join(save, "checkpoint_last.pt")
    ours = str(tmp_path / "ema.pt")
    run([tool("fairseq-hash-consolidate"), last, "--ema", "--output", ours])

    raw = torch.load(last, map_location="cpu", weights_only=False)
    ema = raw["extra_state"]["ema_fp32_params" if fp32 else "ema"]
    written = torch.load(ours, map_location="cpu", weights_only=False)["model"]
    assert written.keys() == raw["model"].keys()
    tables = [k for k in written if k.endswith("router.table")]
    assert len(tables) == 2 and all(torch.equal(written[k], raw["model"][k]) for k in tables)
    assert all(torch.equal(written[k], ema[k]) for k in written)
    expert = "decoder.layers.0.fc1.experts.fc1_weight"
    assert not torch.equal(written[expert], raw["model"][expert])  # an average, not the weights

    # scored as fairseq's own EMA export scores, and not as the trained weights
    theirs = str(tmp_path / "fairseq-ema.pt")
    checkpoint_utils.save_ema_as_checkpoint(last, theirs)
    loss = eval_loss(data_bin, ours)
    assert loss == pytest.approx(eval_loss(data_bin, theirs), abs=1e-4)
    assert loss != eval_loss(data_bin, last) and loss < 8


def test_ema_of_a_checkpoint_without_it_is_refused(trained, tmp_path):
    save, _ = trained
    out = str(tmp_path / "ema.pt")
    proc = run([tool("fairseq-hash-consolidate"), os.path.join(save, "checkpoint_last.pt"),
                "--ema", "--output", out], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fairseq-hash-consolidate: error: --ema: {save}/checkpoint_last.pt holds no EMA "
        f"weights (fairseq-train saves them with --store-ema)"]
    assert not os.path.exists(out)
