"""The main job, shrunk: corpus -> sentencepiece -> data-bin -> train -> eval -> samples."""
from conftest import run, tool
from fairseq_hash.cli.data.corpus import builtin_corpus_lines


def test_builtin_corpus_is_deterministic_and_not_empty():
    first = builtin_corpus_lines(max_lines=300)
    assert len(first) == 300 and all(len(l.split()) >= 4 for l in first)
    assert builtin_corpus_lines(max_lines=300) == first


def test_demo_on_user_text_writes_everything(tmp_path):
    text = tmp_path / "my.txt"
    text.write_text("\n".join(builtin_corpus_lines(max_lines=600)) + "\n")
    out = tmp_path / "demo"
    proc = run([tool("fairseq-hash-demo"), str(text), "--output-dir", str(out),
                "--layers", "1", "--embed-dim", "32", "--ffn-dim", "64", "--experts", "2",
                "--max-update", "6", "--vocab-size", "100", "--samples", "1", "--compare-dense",
                "--optimizer", "fused_adamw"])
    for name in ("data/data-bin/dict.txt", "data/spm.model", "checkpoints/checkpoint_best.pt",
                 "train.log", "eval_test.log", "samples.txt", "commands.sh"):
        assert (out / name).exists(), name
    assert "test perplexity (fairseq-eval-lm):" in proc.stdout
    assert "the same model without hash layers" in proc.stdout
    assert (out / "train_dense.log").exists()
    commands = (out / "commands.sh").read_text().splitlines()
    trainings = [l for l in commands if l.split()[0].endswith("fairseq-train")]
    assert len(trainings) == 2 and all("--optimizer fused_adamw" in l for l in trainings)
    assert (out / "samples.txt").read_text().startswith("Return the")
    # a second run must not overwrite the trained model
    again = run([tool("fairseq-hash-demo"), str(text), "--output-dir", str(out)],
                check=False)
    assert again.returncode != 0 and "already holds a trained model" in again.stderr
