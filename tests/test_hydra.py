"""fairseq-hydra-train trains hash_transformer_lm from the YAML config in fairseq_hash/config/."""
import os

import torch

import fairseq_hash  # noqa: F401  (lets torch.load read fairseq's checkpoints)
from conftest import json_logs, run, tool, user_dir


def test_hydra_train_from_the_packaged_yaml_config(data_bin, tmp_path):
    config_dir = os.path.join(user_dir(), "config")
    assert os.path.isfile(os.path.join(config_dir, "hash_lm_tiny.yaml"))
    save = str(tmp_path / "ckpt")
    proc = run([tool("fairseq-hydra-train"), "--config-dir", config_dir,
                "--config-name", "hash_lm_tiny", f"task.data={data_bin}",
                f"common.user_dir={user_dir()}", f"checkpoint.save_dir={save}",
                "optimization.max_update=30", "model.hash_experts=3",
                f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=str(tmp_path))
    # hydra logs "[time][train_inner][INFO] - {...}": the same json as fairseq-train's
    log = (proc.stdout + proc.stderr).replace("[train_inner][INFO] - {", " | train_inner | {")
    losses = [row["loss"] for row in json_logs(log, "train_inner")]
    state = torch.load(os.path.join(save, "checkpoint_last.pt"))
    assert state["cfg"]["model"]["_name"] == "hash_transformer_lm"
    assert state["model"]["decoder.layers.1.fc1.experts.fc1_weight"].size(0) == 3  # the override
    assert state["optimizer_history"][-1]["num_updates"] == 30
    assert "decoder.layers.1.fc1.router.table" in state["model"]
    assert len(losses) == 3 and losses[-1] < losses[0]
