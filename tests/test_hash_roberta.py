"""hash_roberta: masked-LM pretraining, then sentence_prediction fine-tuning from its checkpoint."""
import os

import pytest
import torch

import fairseq_hash  # noqa: F401  (lets torch.load read fairseq's argparse checkpoints)
from conftest import TINY_TRAIN, json_logs, preprocess, run, tool, user_dir, write_corpus
from models_util import TINY_ROBERTA, build_in_process, classification_data
from test_bad_input import error_line

FINETUNE = ["--task", "sentence_prediction", "--criterion", "sentence_prediction",
            "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
            "--reset-optimizer", "--reset-dataloader", "--reset-meters",
            "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(data-bin, checkpoint) of a tiny hash_roberta after 20 masked-LM updates."""
    root = tmp_path_factory.mktemp("roberta")
    data = preprocess(write_corpus(str(root / "raw")), str(root / "data-bin"))
    save = str(root / "pretrained")
    run([tool("fairseq-train"), data, "--user-dir", user_dir(), "--task", "masked_lm",
         "--criterion", "masked_lm", *TINY_ROBERTA, "--tokens-per-sample", "64", *TINY_TRAIN,
         "--max-update", "20", "--save-dir", save])
    return data, os.path.join(save, "checkpoint_last.pt")


def finetune(data, ckpt, save, *extra, check=True):
    return run([tool("fairseq-train"), data, "--user-dir", user_dir(), *TINY_ROBERTA, *FINETUNE,
                *TINY_TRAIN, "--lr", "0.002", "--max-update", "40", "--restore-file", ckpt,
                "--save-dir", save, *extra], check=check)


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    data, ckpt = pretrained
    root = tmp_path_factory.mktemp("finetune")
    cls = classification_data(str(root), os.path.join(data, "dict.txt"))
    save = str(root / "ckpt")
    proc = finetune(cls, ckpt, save)
    return save, proc.stdout + proc.stderr


def test_sentence_prediction_finetuning_beats_chance(finetuned):
    _, log = finetuned
    accuracy = json_logs(log, "valid")[-1]["valid_accuracy"]
    assert accuracy > 75  # two balanced classes: chance is 50


def test_finetuning_keeps_the_pretrained_tables_bit_identical(pretrained, finetuned):
    _, ckpt = pretrained
    save, _ = finetuned
    before = torch.load(ckpt)["model"]
    after = torch.load(os.path.join(save, "checkpoint_last.pt"))["model"]
    tables = [k for k in before if k.endswith("router.table")]
    assert tables == ["encoder.sentence_encoder.layers.0.fc1.router.table",
                      "encoder.sentence_encoder.layers.1.fc1.router.table"]
    for key in tables:
        assert torch.equal(after[key], before[key])
    # and the experts did train
    experts = "encoder.sentence_encoder.layers.0.fc1.experts.fc1_weight"
    assert not torch.equal(after[experts], before[experts])


def test_finetuning_with_another_dictionary_is_refused_and_writes_nothing(pretrained, tmp_path):
    data, ckpt = pretrained
    # input0 binarised with its own dictionary, not the pretrained one
    cls = classification_data(str(tmp_path), os.path.join(data, "dict.txt"))
    other = os.path.join(str(tmp_path), "other-bin")
    os.makedirs(other)
    for field in ("input0", "label"):
        run([tool("fairseq-preprocess"), "--only-source", "--trainpref",
             os.path.join(str(tmp_path), "raw", f"train.{field}"), "--validpref",
             os.path.join(str(tmp_path), "raw", f"valid.{field}"),
             "--destdir", os.path.join(other, field), "--workers", "1"])
    assert cls != other
    save = str(tmp_path / "ckpt")
    line = error_line(finetune(other, ckpt, save, check=False))
    assert "was built for another dictionary" in line
    assert not os.path.exists(save) or os.listdir(save) == []


def test_masked_positions_route_by_the_mask_symbol(pretrained):
    data, _ = pretrained
    model, task = build_in_process([data, "--task", "masked_lm", *TINY_ROBERTA,
                                    "--tokens-per-sample", "64", "--cpu", "--hash-type", "random"])
    model.eval()
    d = task.source_dictionary
    mask = d.index("<mask>")
    tokens = torch.tensor([[d.bos(), d.index("w1"), d.index("w2"), d.index("w3"), d.eos()]])
    masked = tokens.clone()
    masked[0, 2] = mask
    with torch.no_grad():
        model(masked)
    for moe in model.encoder.sentence_encoder.moe_layers.values():
        got = moe.last_indices[:, 0]  # [T*B] with B = 1
        assert torch.equal(got, moe.router.table[masked[0], 0])
        assert got[2] == moe.router.table[mask, 0]
