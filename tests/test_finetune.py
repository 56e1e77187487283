"""fairseq-hash-finetune: dense, hash and upcycled models pretrained, fine-tuned and tested alike."""
import math
import json
import os
import random
import sys

import pytest

from conftest import run

# the smallest models and runs the command takes; about a minute on 2 cores
TINIEST = ["--preset", "tiny", "--vocab-size", "60", "--layers", "1", "--embed-dim", "32",
           "--ffn-dim", "64", "--heads", "2", "--experts", "2", "--max-positions", "32",
           "--max-tokens", "512", "--pretrain-updates", "10", "--finetune-updates", "60",
           "--validate-every", "30", "--warmup-updates", "5", "--finetune-lr", "0.003"]


def finetune_command(*args):
    return [sys.executable, "-m", "fairseq_hash.cli.experiments.finetune", *map(str, args)]


def write_labelled(folder, n=500, seed=0):
    """Lines of words from one of two disjoint word sets; the label names the set."""
    rng = random.Random(seed)
    sets = {"red": [f"ro{i}" for i in range(8)], "blue": [f"bu{i}" for i in range(8)]}
    text, labels = os.path.join(folder, "text.txt"), os.path.join(folder, "labels.txt")
    with open(text, "w") as x, open(labels, "w") as y:
        for _ in range(n):
            label = rng.choice(sorted(sets))
            x.write(" ".join(rng.choice(sets[label]) for _ in range(rng.randint(3, 8))) + "\n")
            y.write(label + "\n")
    return text, labels


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finetune"))
    text, labels = write_labelled(root)
    out = os.path.join(root, "out")
    run(finetune_command("--output-dir", out, "--text", text, "--labels", labels, "--tasks",
                         "classify", *TINIEST))
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def test_finetune_writes_results_markdown_json_and_plot(results):
    out, _ = results
    for name in ("results.md", "results.json", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "| dense |" in table and "| hash | 2 |" in table and "| upcycled | 2 |" in table
    assert "Next utterance" not in table  # --tasks classify


def test_finetune_reports_test_accuracy_of_every_model_in_unit_interval(results):
    out, data = results
    rows = {r["model"]: r for r in data["rows"]}
    assert sorted(rows) == ["dense", "hash", "upcycled"] and data["seq2seq_rows"] == []
    for row in rows.values():
        assert row["ok"]
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 <= row["valid_accuracy"] <= 1.0
    # the hash model holds K = 2 experts where dense has one FFN; upcycled is a hash model
    assert rows["hash"]["total_params"] > rows["dense"]["total_params"]
    assert rows["upcycled"]["total_params"] == rows["hash"]["total_params"]
    # upcycled is not pretrained: it starts from dense's pretrained checkpoint
    assert rows["upcycled"]["pretrain_valid_loss"] is None
    with open(os.path.join(out, "runs", "upcycled", "upcycle.log")) as f:
        assert os.path.join("runs", "dense", "pretrain", "checkpoint_last.pt") in f.readline()
    # checkpoints are deleted once every model is done (no --keep-checkpoints)
    assert not os.path.exists(os.path.join(out, "runs", "dense", "pretrain"))


def test_finetune_learns_a_learnable_label_above_chance(results):
    _, data = results
    chance = data["settings"]["chance"]
    assert data["settings"]["classes"] == 2 and chance < 0.6
    for row in data["rows"]:
        assert row["test_accuracy"] > chance + 0.2, row


def test_labels_of_another_length_are_refused_in_one_line_and_nothing_written(tmp_path):
    text, labels = write_labelled(str(tmp_path), n=20)
    with open(labels, "a") as f:
        f.write("red\n")
    out = str(tmp_path / "out")
    proc = run(finetune_command("--output-dir", out, "--text", text, "--labels", labels),
               check=False)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash-finetune: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--labels" in errors[0] and "21 lines" in errors[0] and "has 20" in errors[0]
    assert not os.path.exists(out)


def test_builtin_task_labels_balanced_packages_of_the_stdlib():
    from fairseq_hash.cli.experiments.finetune_classify import package_lines
    from fairseq_hash.cli.data.corpus import builtin_corpus_items

    lines, labels = package_lines(3)
    counts = {label: labels.count(label) for label in set(labels)}
    assert len(counts) == 3 and len(set(counts.values())) == 1
    module_of = {line: name for name, line in builtin_corpus_items()}
    for line, label in zip(lines, labels):
        # the label is the package the paragraph's module belongs to
        assert module_of[line].split(".")[0] == label
    assert all(any(m.startswith(p + ".") for m in module_of.values()) for p in counts)


def test_finetune_takes_an_existing_data_bin(results, tmp_path):
    out, first = results
    # recorded relative to the output folder, so the results name no folder of this machine
    assert first["settings"]["data"] == os.path.join("data", "cls-bin")
    cls_bin = os.path.join(out, first["settings"]["data"])
    again = str(tmp_path / "again")
    run(finetune_command("--output-dir", again, "--data-bin", cls_bin, "--models", "hash",
                         "--tasks", "classify", *TINIEST, "--finetune-updates", "10", "--validate-every", "10"))
    with open(os.path.join(again, "results.json")) as f:
        data = json.load(f)
    assert data["settings"]["data"] == os.path.relpath(cls_bin, again)
    assert data["settings"]["classes"] == 2
    assert [r["model"] for r in data["rows"]] == ["hash"] and data["rows"][0]["ok"]
    assert not os.path.exists(os.path.join(again, "data"))  # nothing prepared again


def test_data_bin_without_labels_is_refused_in_one_line(tmp_path):
    (tmp_path / "input0").mkdir()
    proc = run(finetune_command("--output-dir", str(tmp_path / "out"), "--data-bin",
                                str(tmp_path)), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fairseq-hash-finetune: error: --data-bin {tmp_path}: no input0/dict.txt; give a folder "
        "of input0/ and label/, each made by fairseq-preprocess --only-source with train, valid "
        "and test splits"]


def write_dialogues(folder, conversations=300, seed=0):
    """Two-turn conversations whose reply is the first turn reversed: a learnable rule."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)]
    path = os.path.join(folder, "dialogues.txt")
    with open(path, "w") as f:
        for _ in range(conversations):
            turn = [rng.choice(words) for _ in range(4)]
            f.write(" ".join(turn) + "\n" + " ".join(reversed(turn)) + "\n\n")
    return path


@pytest.fixture(scope="module")
def seq2seq_results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finetune-s2s"))
    out = os.path.join(root, "out")
    run(finetune_command("--output-dir", out, "--tasks", "seq2seq", "--dialogues",
                         write_dialogues(root), *TINIEST, "--vocab-size", "200",
                         "--max-positions", "64", "--finetune-updates", "40",
                         "--validate-every", "20"))
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def test_seq2seq_rows_of_every_model_report_perplexity_and_bleu(seq2seq_results):
    out, data = seq2seq_results
    rows = {r["model"]: r for r in data["seq2seq_rows"]}
    assert sorted(rows) == ["dense", "hash", "upcycled"] and data["rows"] == []
    for row in rows.values():
        assert row["ok"], row
        assert math.isfinite(row["valid_ppl"]) and row["valid_ppl"] >= 1
        assert 0 <= row["test_bleu"] <= 100 and row["test_sentences"] > 0
    assert rows["upcycled"]["total_params"] == rows["hash"]["total_params"] > rows["dense"]["total_params"]
    assert rows["upcycled"]["pretrain_valid_ppl"] is None
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "## Next utterance" in table and "| upcycled | 2 |" in table
    assert "## Classification" not in table
    # fine-tuning is on the dialogues, with the pretraining data-bin's dictionary
    pre, fine = (os.path.join(out, data["settings"][f"s2s_{s}_data"]) for s in ("pretrain", "finetune"))
    with open(os.path.join(pre, "dict.src.txt")) as a, open(os.path.join(fine, "dict.src.txt")) as b:
        assert a.read() == b.read()
    assert data["settings"]["s2s_finetune_sizes"].split("/")[0] != "0"


def test_seq2seq_fine_tuning_learns_the_reply_rule(seq2seq_results):
    _, data = seq2seq_results
    for row in data["seq2seq_rows"]:
        (_, first), (_, last) = row["curve"][0], row["curve"][-1]
        assert last < first / 2, row


def test_upcycled_without_dense_is_refused_in_one_line_and_nothing_written(tmp_path):
    out = str(tmp_path / "out")
    proc = run(finetune_command("--output-dir", out, "--models", "hash,upcycled"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fairseq-hash-finetune: error: --models 'hash,upcycled': upcycled fine-tunes dense's "
        "pretrained model; add dense"]
    assert not os.path.exists(out)


def test_dialogues_without_a_pair_are_refused_in_one_line(tmp_path):
    path = tmp_path / "one-turn-each.txt"
    path.write_text("hello there\n\nanother conversation\n")
    out = str(tmp_path / "out")
    proc = run(finetune_command("--output-dir", out, "--dialogues", str(path)), check=False)
    assert proc.returncode == 2
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"fairseq-hash-finetune: error: --dialogues {path}")
    assert not os.path.exists(out)
