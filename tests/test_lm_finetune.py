"""Fine-tuning a hash LM on new text: --finetune-from-model, or --restore-file with --reset-*."""
import os

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir, write_corpus

WAYS = {
    "finetune-from-model": lambda ckpt: ["--finetune-from-model", ckpt],
    "restore-file": lambda ckpt: ["--restore-file", ckpt, "--reset-optimizer",
                                  "--reset-dataloader", "--reset-meters"],
}


@pytest.fixture(scope="module")
def new_text(tmp_path_factory, data_bin):
    """Other sentences of the same kind, binarised with the pretrained model's dictionary."""
    root = tmp_path_factory.mktemp("new-text")
    raw = write_corpus(str(root / "raw"), lines=300, seed=7)
    dest = str(root / "data-bin")
    run([tool("fairseq-preprocess"), "--only-source", "--srcdict", os.path.join(data_bin, "dict.txt"),
         "--trainpref", os.path.join(raw, "train.txt"), "--validpref", os.path.join(raw, "valid.txt"),
         "--destdir", dest, "--workers", "1"])
    return dest


@pytest.mark.parametrize("way", list(WAYS))
def test_finetuning_continues_the_lm_with_its_tables(trained, new_text, tmp_path, way):
    save, pretrain_log = trained
    ckpt = os.path.join(save, "checkpoint_last.pt")
    out = str(tmp_path / "ckpt")
    proc = run([tool("fairseq-train"), new_text, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN,
                "--max-update", "10", "--save-dir", out, *WAYS[way](ckpt)])
    rows = json_logs(proc.stdout + proc.stderr, "train_inner")
    assert int(rows[0]["num_updates"]) == 5  # a new run: updates count from 0
    # it starts where pretraining ended, far below a fresh model's first loss
    assert rows[0]["loss"] < json_logs(pretrain_log, "train_inner")[0]["loss"] - 1.0
    before = torch.load(ckpt, weights_only=False)["model"]
    after = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=False)["model"]
    tables = [k for k in before if k.endswith("router.table")]
    assert len(tables) == 2 and all(torch.equal(after[k], before[k]) for k in tables)
