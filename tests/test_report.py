"""fairseq-hash-report: routing statistics of a trained model over a split."""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from hashfns_util import hashfns_corpus, hashfns_multihash_checkpoint, hashfns_run
from fairseq_hash.cli.report import load_stats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return hashfns_corpus(str(tmp_path_factory.getbasetemp() / "hashfns_corpus"))


@pytest.fixture(scope="module")
def multihash_checkpoint(tmp_path_factory, corpus):
    return hashfns_multihash_checkpoint(tmp_path_factory.getbasetemp(), corpus)


def test_report_writes_json_and_a_plot_per_layer(tmp_path, corpus, multihash_checkpoint):
    out = tmp_path / "report"
    proc = hashfns_run(["fairseq-hash-report", multihash_checkpoint, corpus, "--subset", "test",
                        "--output-dir", out, "--top", 3, "--compare", multihash_checkpoint])
    result = json.loads((out / "routing.json").read_text())
    assert result["subset"] == "test" and result["tokens"] > 0
    assert set(result["layers"]) == {"0", "1"}
    for idx, layer in result["layers"].items():
        assert (out / f"load_layer{idx}.png").read_bytes()[:4] == b"\x89PNG"
        assert layer["hash_type"] == "bigram" and layer["num_experts"] == 4
        # two hashes a token: every token is counted twice over all experts
        assert sum(layer["tokens"]) == 2 * result["tokens"]
        assert math.isclose(sum(layer["share"]), 1.0, abs_tol=1e-4)
        assert len(layer["per_hash"]) == 2
        assert all(sum(h["tokens"]) == result["tokens"] for h in layer["per_hash"])
        assert layer["max_over_mean"] >= 1.0
        assert len(layer["top_tokens"]) == 4 and all(len(t) <= 3 for t in layer["top_tokens"])
    assert result["compare"]["changed"] == {"0": 0.0, "1": 0.0}  # the same tables
    assert "perplexity" in proc.stdout and math.isfinite(result["perplexity"])


def test_report_prints_its_summary_and_nothing_else(tmp_path, corpus, multihash_checkpoint):
    # as a user runs it: warnings not silenced by PYTHONWARNINGS
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-hash-report"),
                           multihash_checkpoint, corpus, "--output-dir", str(tmp_path / "report")],
                          capture_output=True, text=True, env=env, check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("valid: ") and lines[-1].endswith("routing.json")
    assert all(line.startswith("layer ") for line in lines[1:-1]) and len(lines) == 4
    assert proc.stderr.strip() == ""  # no debug lines, no library warnings


def test_load_statistics_of_a_known_routing():
    import torch

    stats = load_stats(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4)
    assert stats["max_over_mean"] == 1.0 and stats["entropy_bits"] == 2.0
    stats = load_stats(torch.tensor([0, 0, 0, 1]), 4)
    assert stats["share"] == [0.75, 0.25, 0.0, 0.0] and stats["max_over_mean"] == 3.0
    assert stats["entropy_normalized"] == round(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) / 2, 4)


def test_report_refuses_a_missing_checkpoint_in_one_line(tmp_path, corpus):
    proc = hashfns_run(["fairseq-hash-report", str(tmp_path / "none.pt"), corpus,
                        "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fairseq-hash-report: error: checkpoint")
    assert not os.path.exists(tmp_path / "routing.json")


def test_hash_study_writes_its_table_and_plot(tmp_path):
    text = tmp_path / "corpus.txt"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(150)]
    lines = [" ".join(rng.choices(words, k=rng.randint(5, 15))) for _ in range(800)]
    text.write_text("\n".join(lines) + "\n")
    work = tmp_path / "study"
    proc = hashfns_run(["python", "-m", "fairseq_hash.cli.experiments.hash_study", text, "--quick",
                        "--work-dir", work, "--runs", "dense,balanced,clustered", "--updates", 2,
                        "--validate-every", 1, "--vocab-size", 100])
    table = (work / "results.md").read_text()
    for row in ("no hash layer", "| balanced |", "| clustered |"):
        assert row in table and row in proc.stdout
    assert (work / "valid_ppl.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["dense", "balanced", "clustered"]
    assert all(len(r["valid_curve"]) == 2 and math.isfinite(r["test_ppl"]) for r in rows)
    assert (work / "tables" / "clustered-4-seed1.json").is_file()
