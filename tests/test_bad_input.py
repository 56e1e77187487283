"""Bad flags and mismatching checkpoints: one clear line, nothing on disk touched."""
import os
import shutil

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, preprocess, run, tool, user_dir, write_corpus


def error_line(proc):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def train_with(data_bin, save_dir, *extra):
    return run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, "--max-update", "50", "--save-dir", save_dir, *extra], check=False)


@pytest.mark.parametrize("flags, expected", [
    (["--hash-layer", "2"], "--hash-layer 2 is outside the model"),
    (["--hash-layer", "-3"], "valid indices are -2..1"),
    (["--hash-layer", "first"], "--hash-layer 'first'"),
    (["--hash-layer", ""], "--hash-layer '' names no layer"),
    (["--hash-layer", "1,1"], "--hash-layer 1,1: 1 and 1 name the same layer"),
    (["--hash-layer", "1,-1"], "1 and -1 name the same layer (1 of --decoder-layers 2)"),
    (["--hash-experts", "1"], "--hash-experts 1: must be at least 2"),
    (["--hash-type", "md5"], "--hash-type 'md5' is unknown; valid:"),
    (["--hash-topk", "2", "--hash-count", "2"], "--hash-topk 2 with --hash-count 2"),
    (["--hash-expert-ffn-dim", "-8"], "--hash-expert-ffn-dim -8: must be a positive width"),
])
def test_bad_flag_gives_one_line_and_keeps_existing_checkpoint(trained, data_bin, tmp_path, flags, expected):
    save, _ = trained
    kept = str(tmp_path / "kept")
    shutil.copytree(save, kept)
    before = {f: open(os.path.join(kept, f), "rb").read() for f in os.listdir(kept)}
    line = error_line(train_with(data_bin, kept, *flags))
    assert expected in line
    after = {f: open(os.path.join(kept, f), "rb").read() for f in os.listdir(kept)}
    assert after == before


def test_checkpoint_with_another_dictionary_is_refused(trained, tmp_path):
    save, _ = trained
    # same number of symbols, other words: only the fingerprint can tell
    other = preprocess(write_corpus(str(tmp_path / "raw"), seed=1, vocab=120), str(tmp_path / "other-bin"))
    with open(os.path.join(other, "dict.txt")) as f:
        lines = f.readlines()
    with open(os.path.join(other, "dict.txt"), "w") as f:
        f.writelines(["zz" + l for l in lines])
    path = os.path.join(save, "checkpoint_last.pt")
    proc = run([tool("fairseq-eval-lm"), other, "--path", path,
                "--user-dir", user_dir(), "--cpu", "--max-tokens", "512"], check=False)
    line = error_line(proc)
    assert f"{path}: the hash table" in line and "was built for another dictionary" in line
    assert "as many rows as the loaded dictionary has symbols, but other symbols" in line


def test_an_ensemble_names_its_model_of_another_dictionary(trained, data_bin, tmp_path):
    save, _ = trained
    other = preprocess(write_corpus(str(tmp_path / "raw"), seed=1, vocab=60), str(tmp_path / "other-bin"))
    proc = train_with(other, str(tmp_path / "other"), "--max-update", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    good, bad = os.path.join(save, "checkpoint_last.pt"), str(tmp_path / "other" / "checkpoint_last.pt")
    from fairseq import checkpoint_utils
    from fairseq_hash.errors import HashConfigError

    # fairseq builds every model of an ensemble with the task (dictionary) of the first
    with pytest.raises(HashConfigError) as refused:
        checkpoint_utils.load_model_ensemble_and_task([good, bad], arg_overrides={"data": data_bin})
    assert str(refused.value).startswith(f"{bad}: the hash table")
    assert "rows x 1 columns, the loaded dictionary gives" in str(refused.value)


@pytest.mark.parametrize("content", ["half", "text", "empty"])
def test_a_truncated_or_foreign_checkpoint_is_refused_in_one_line(trained, data_bin, tmp_path, content):
    save, _ = trained
    whole = open(os.path.join(save, "checkpoint_last.pt"), "rb").read()
    path = str(tmp_path / "checkpoint.pt")
    with open(path, "wb") as f:
        f.write({"half": whole[: len(whole) // 2], "text": b"hello world\n", "empty": b""}[content])
    proc = run([tool("fairseq-eval-lm"), data_bin, "--path", path,
                "--user-dir", user_dir(), "--cpu", "--max-tokens", "512"], check=False)
    line = error_line(proc)
    assert line.startswith(f"fairseq-hash: error: {path}: not a readable checkpoint (")
    assert line.endswith("is the file complete? give a checkpoint written by fairseq-train")


def test_resuming_with_another_number_of_experts_is_refused(trained, data_bin, tmp_path):
    save, _ = trained
    kept = str(tmp_path / "kept")
    shutil.copytree(save, kept)
    before = open(os.path.join(kept, "checkpoint_last.pt"), "rb").read()
    proc = train_with(data_bin, kept, "--hash-experts", "8")
    assert "the checkpoint has 4 experts in decoder hash layer 0 but --hash-experts is 8" in error_line(proc)
    assert open(os.path.join(kept, "checkpoint_last.pt"), "rb").read() == before


def test_resuming_with_another_hash_type_is_refused(trained, data_bin, tmp_path):
    save, _ = trained  # trained with the default --hash-type balanced
    kept = str(tmp_path / "kept")
    shutil.copytree(save, kept)
    before = open(os.path.join(kept, "checkpoint_last.pt"), "rb").read()
    proc = train_with(data_bin, kept, "--hash-type", "random")
    assert ("hash layer 0 of the checkpoint was trained with --hash-type balanced but "
            "--hash-type is random" in error_line(proc))
    assert open(os.path.join(kept, "checkpoint_last.pt"), "rb").read() == before
