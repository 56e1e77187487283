"""fairseq_runner: one way to run fairseq's tools and read what they log."""
import sys

import torch

from fairseq_hash.cli import fairseq_runner
from fairseq_hash.cli.experiments import hash_study
from fairseq_hash.cli.fairseq_runner import fairseq_argv, read_log, run_fairseq

LOG = """\
2026-11-29 13:33:10 | INFO | fairseq_cli.train | num. shared model params: 1,952,256 (num. trained: 1,952,256)
2026-11-29 13:33:10 | INFO | fairseq_cli.train | num. expert model params: 1975680 (num. trained: 1975680)
2026-11-29 13:33:20 | INFO | train_inner | {"epoch": 1, "update": 0.1, "loss": "9.1", "wps": "5000.5", "num_updates": "25"}
2026-11-29 13:33:30 | INFO | valid | {"epoch": 1, "valid_loss": "8.396", "valid_ppl": "336.89", "valid_num_updates": "50"}
2026-11-29 13:33:40 | INFO | fairseq_cli.eval_lm | Loss (base 2): 8.3953, Perplexity: 336.69
"""


def test_records_parameters_and_perplexity_come_from_the_log(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(LOG)
    run = read_log("fairseq-train", str(path))
    assert run.records("valid") == [{"epoch": 1.0, "valid_loss": 8.396, "valid_ppl": 336.89,
                                     "valid_num_updates": 50.0}]
    assert [r["wps"] for r in run.records("train_inner")] == [5000.5]
    assert run.parameters() == {"shared": 1952256, "expert": 1975680}
    assert run.eval_lm_perplexity() == 336.69


def test_a_tool_runs_under_this_interpreter_and_its_log_starts_with_the_command(tmp_path):
    assert fairseq_argv("fairseq-eval-lm", ["d", 3])[:3] == [sys.executable, "-m",
                                                           "fairseq_cli.eval_lm"]
    assert fairseq_argv("fairseq-hash-upcycle", ["d"])[:3] == [sys.executable, "-m",
                                                             "fairseq_hash.cli.upcycle"]
    seen = []
    run = run_fairseq("fairseq-preprocess", ["--help"], str(tmp_path / "help.log"), seen.append)
    assert run.ok and run.peak_rss_mb > 0 and seen == run.lines
    log = (tmp_path / "help.log").read_text().splitlines()
    assert log[0] == "# fairseq-preprocess --help" and any("--trainpref" in l for l in log)


def test_hash_study_trains_on_the_gpu_when_torch_sees_one(monkeypatch):
    args = hash_study.parse_args(["--quick"])
    assert "--cpu" in hash_study.train_flags(args, 1) or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--cpu" not in hash_study.train_flags(args, 1)
    assert fairseq_runner.device_flags() == []
