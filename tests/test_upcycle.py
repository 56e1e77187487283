"""fairseq-hash-upcycle: dense checkpoints of each family become hash checkpoints."""
import io
import os
import sys

import pytest
import torch

import fairseq_hash  # noqa: F401  (lets torch.load read fairseq's argparse checkpoints)
from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from models_util import TINY_ROBERTA, TINY_SEQ2SEQ, seq2seq_data

HASH_VALUED = {"--hash-experts", "--hash-layer", "--encoder-hash-layer", "--decoder-hash-layer"}


def dense(flags, arch):
    """The model flags without our hash flags, for fairseq's dense ``arch``."""
    out, skip = [], False
    for i, flag in enumerate(flags):
        if skip:
            skip = False
        elif flag in HASH_VALUED:
            skip = True
        elif flags[i - 1] == "--arch":
            out.append(arch)
        else:
            out.append(flag)
    return out


# family: (dense model flags, extra training flags, upcycle flags)
FAMILIES = {
    "transformer_lm": (dense(TINY_MODEL, "transformer_lm"), [], ["--hash-layer", "0,-1"]),
    "transformer": (dense(TINY_SEQ2SEQ, "transformer_tiny"), [],
                    ["--encoder-hash-layer", "0,-1", "--decoder-hash-layer", "-1"]),
    "roberta": (dense(TINY_ROBERTA, "roberta"),
                ["--task", "masked_lm", "--criterion", "masked_lm", "--tokens-per-sample", "64"],
                ["--encoder-hash-layer", "-1"]),
}


def upcycle_cmd(*args):
    return [sys.executable, "-m", "fairseq_hash.cli.upcycle", *map(str, args)]


def error_line(proc):
    """The one line a failed fairseq-hash-upcycle prints."""
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash-upcycle: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory, data_bin):
    """family -> (data folder, dense checkpoint after 3 updates)."""
    root = tmp_path_factory.mktemp("dense")
    pairs = seq2seq_data(str(root / "pairs"))
    out = {}
    for family, (model, extra, _) in FAMILIES.items():
        data = pairs if family == "transformer" else data_bin
        save = str(root / family)
        run([tool("fairseq-train"), data, *model, *extra, *TINY_TRAIN, "--max-update", "3",
             "--save-dir", save])
        out[family] = data, os.path.join(save, "checkpoint_last.pt")
    return out


def outputs(path, family):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].eval()
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(task.source_dictionary), (3, 11), generator=gen)
    with torch.no_grad():
        if family == "transformer":
            tgt = torch.randint(4, len(task.target_dictionary), (3, 7), generator=gen)
            return model(src, torch.full((3,), 11), tgt)[0]
        return model(src)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_upcycled_outputs_equal_the_dense_outputs(dense_checkpoints, family, tmp_path):
    data, ckpt = dense_checkpoints[family]
    out = str(tmp_path / "hash.pt")
    run(upcycle_cmd(ckpt, *FAMILIES[family][2], "--hash-experts", 4, "--output", out))
    state = torch.load(out)
    tables = [k for k in state["model"] if k.endswith("router.table")]
    assert len(tables) == {"transformer_lm": 2, "transformer": 3, "roberta": 1}[family]
    model_cfg = state["cfg"]["model"]
    name = model_cfg["_name"] if isinstance(model_cfg, dict) else model_cfg.arch
    assert name.startswith("hash_" + family)
    expected = outputs(ckpt, family)
    got = outputs(out, family)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_upcycled_lm_trains_on_with_its_tables(dense_checkpoints, tmp_path):
    data, ckpt = dense_checkpoints["transformer_lm"]
    out = str(tmp_path / "hash.pt")
    run(upcycle_cmd(ckpt, "--hash-layer", "0,-1", "--hash-experts", 4, "--output", out))
    save = str(tmp_path / "ckpt")
    proc = run([tool("fairseq-train"), data, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN,
                "--max-update", "10", "--save-dir", save, "--finetune-from-model", out])
    losses = [row["loss"] for row in json_logs(proc.stdout + proc.stderr, "train_inner")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    before, after = torch.load(out)["model"], torch.load(os.path.join(save, "checkpoint_last.pt"))["model"]
    for key in (k for k in before if k.endswith("router.table")):
        assert torch.equal(after[key], before[key])
    experts = "decoder.layers.1.fc1.experts.fc1_weight"
    assert not torch.equal(after[experts][0], after[experts][1])  # the copies drift apart


@pytest.mark.parametrize("breakage", ["missing", "shape"])
def test_a_layer_without_a_dense_ffn_of_the_right_shape_is_refused(dense_checkpoints, tmp_path,
                                                                    breakage):
    _, ckpt = dense_checkpoints["transformer_lm"]
    state = torch.load(ckpt)
    key = "decoder.layers.1.fc1.weight"
    if breakage == "missing":
        del state["model"][key]
    else:
        state["model"][key] = state["model"][key][:32]
    broken = str(tmp_path / "broken.pt")
    torch.save(state, broken)
    out = str(tmp_path / "hash.pt")
    line = error_line(run(upcycle_cmd(broken, "--hash-layer", "-1", "--hash-experts", 4,
                                      "--output", out), check=False))
    assert "decoder layer 1 has no dense FFN of the model's shape" in line
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


@pytest.mark.parametrize("flags, expected", [
    (["--hash-layer", "-1"], "--hash-layer does not apply to transformer_tiny"),
    (["--encoder-hash-layer", "2"], "--encoder-hash-layer 2 is outside the model: with "
                                    "--encoder-layers 2"),
])
def test_bad_upcycle_flags_give_one_line_and_write_nothing(dense_checkpoints, tmp_path, flags,
                                                          expected):
    _, ckpt = dense_checkpoints["transformer"]
    out = str(tmp_path / "hash.pt")
    line = error_line(run(upcycle_cmd(ckpt, *flags, "--output", out), check=False))
    assert expected in line
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("kind", ["truncated", "not a checkpoint"])
def test_a_file_that_is_no_checkpoint_gives_one_line_naming_it_and_keeps_what_exists(
        dense_checkpoints, tmp_path, kind):
    _, ckpt = dense_checkpoints["transformer_lm"]
    broken = str(tmp_path / "broken.pt")
    with open(ckpt, "rb") as f:
        whole = f.read()
    if kind == "truncated":  # as a copy or a full disk leaves it
        content = whole[:len(whole) // 2]
    else:
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, buffer)
        content = buffer.getvalue()
    with open(broken, "wb") as f:
        f.write(content)
    out = str(tmp_path / "hash.pt")
    line = error_line(run(upcycle_cmd(broken, "--hash-layer", "-1", "--output", out), check=False))
    assert line.startswith(f"fairseq-hash-upcycle: error: {broken}: not a")
    assert sorted(os.listdir(str(tmp_path))) == ["broken.pt"]
    assert open(broken, "rb").read() == content


def test_an_existing_output_is_refused_and_kept(dense_checkpoints, tmp_path):
    _, ckpt = dense_checkpoints["transformer_lm"]
    out = tmp_path / "hash.pt"
    out.write_bytes(b"kept")
    line = error_line(run(upcycle_cmd(ckpt, "--hash-layer", "-1", "--output", out), check=False))
    assert f"--output {out} exists" in line and out.read_bytes() == b"kept"
