"""fairseq-hash-compare: one command, every model alike, three result files."""
import json
import os

import pytest

from fairseq_hash.cli.experiments import compare


def test_compare_writes_results_with_a_row_per_model(data_bin, tmp_path, capsys):
    # three models keep this quick; the slow test below runs them all
    models = ["dense", "hash", "top2"]
    out = tmp_path / "cmp"
    code = compare.main(["--output-dir", str(out), "--preset", "tiny", "--data-bin", data_bin,
                         "--models", ",".join(models),
                         "--max-update", "4", "--validate-every", "2", "--warmup-updates", "2",
                         "--tokens-per-sample", "32", "--max-tokens", "256",
                         "--optimizer", "fused_adamw"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["name"] for r in rows] == models
    # the data path relative to the output folder: no folder of this machine in the results
    assert results["settings"]["data"] == os.path.relpath(data_bin, out)
    for r in rows:
        assert r["ok"] and r["test_ppl"] > 1 and r["valid_ppl"] > 1, r
        assert [u for u, *_ in r["curve"]] == [2, 4]
        run_dir = out / "runs" / r["name"] / "seed1"
        train_log = (run_dir / "train.log").read_text()
        assert "--optimizer fused_adamw" in train_log.splitlines()[0]  # the command it ran
        assert (run_dir / "eval_test.log").exists()
        assert r["valid_ppl"] is not None and r["valid_ppl"] > 1
    by = {r["name"]: r for r in rows}
    # same shared model, K experts in the routed layer; one expert (two for top2) a token
    assert by["hash"]["active_params"] == by["dense"]["total_params"]
    assert by["hash"]["total_params"] > by["dense"]["total_params"]
    assert by["top2"]["active_params"] > by["hash"]["active_params"]
    assert by["top2"]["aux_loss"] > 0 and by["hash"]["aux_loss"] == 0
    table = (out / "results.md").read_text()
    for name in models:
        assert f"| {name} |" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "[3/3 top2 seed 1] done" in capsys.readouterr().out  # progress on the console


def test_compare_runs_every_routed_model_once_per_expert_count():
    runs = compare.plan_runs(["dense", "hash", "switch"], [4, 16])
    assert runs == [("dense", "dense", None), ("hash-k4", "hash", 4), ("hash-k16", "hash", 16),
                    ("switch-k4", "switch", 4), ("switch-k16", "switch", 16)]


@pytest.mark.parametrize("argv,message", [
    (["--models", "dense,gshard"], "--models 'dense,gshard': unknown gshard; valid: dense,hash"),
    (["--experts", "1"], "--experts '1': expected integers >= 2"),
    (["--data-bin", "/nonexistent"], "--data-bin /nonexistent: no dict.txt there"),
    (["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
    (["--embed-dim", "30", "--heads", "4"], "--embed-dim 30 must be a multiple of --heads 4"),
])
def test_compare_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    code = compare.main(["--output-dir", str(tmp_path), "--preset", "tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_compare_tiny_preset_on_the_builtin_corpus_runs_end_to_end(tmp_path):
    import time

    start = time.time()
    assert compare.main(["--output-dir", str(tmp_path), "--preset", "tiny"]) == 0
    for name in ("results.md", "results.json", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # every model of the default --models, hash-top2 and hash-shared included
    assert [r["name"] for r in rows] == list(compare.MODELS) and all(r["ok"] for r in rows)
    print(f"--preset tiny took {time.time() - start:.0f}s")


def seed_run(name, seed, test_ppl, curve):
    return {"name": name, "model": name, "experts": None if name == "dense" else 4, "seed": seed,
            "total_params": 10, "active_params": 10, "valid_ppl": test_ppl + 1,
            "test_ppl": test_ppl, "logged_valid_ppl": curve[-1][1], "train_wps": 100.0,
            "aux_loss": 0.0, "dropped": 0.0, "curve": curve, "seconds": 1.0, "ok": True}


def test_seeds_give_each_model_a_mean_and_standard_deviation_and_a_curve_relative_to_dense(
        tmp_path):
    runs = [seed_run("dense", 1, 70.0, [(2, 100.0), (4, 80.0)]),
            seed_run("hash", 1, 68.0, [(2, 90.0), (4, 76.0)]),
            seed_run("dense", 2, 72.0, [(2, 110.0), (4, 90.0)]),
            seed_run("hash", 2, 72.0, [(2, 110.0), (4, 81.0)])]
    rows = compare.write_results(str(tmp_path), runs, {"seeds": 2})
    hash_row = rows[1]
    assert hash_row["seeds"] == [1, 2]
    assert hash_row["test_ppl"] == 70.0 and abs(hash_row["test_ppl_sd"] - 8 ** 0.5) < 1e-9
    assert [(u, m) for u, m, _ in hash_row["curve"]] == [(2, 100.0), (4, 78.5)]
    # seed by seed over dense: update 2: 0.9 and 1.0; update 4: 0.95 and 0.9
    (u2, mean2, sd2), (u4, mean4, _) = hash_row["relative_curve"]
    assert (u2, u4) == (2, 4) and abs(mean2 - 0.95) < 1e-9 and abs(mean4 - 0.925) < 1e-9
    assert abs(sd2 - 0.1 / 2 ** 0.5) < 1e-9
    table = (tmp_path / "results.md").read_text()
    assert "| hash | 4 | 10 | 10 | 71.00 ± 2.83 | 70.00 ± 2.83 |" in table
    assert "| hash | 68.00 | 72.00 |" in table  # each seed's test perplexity
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
