"""fairseq-hash-prepare --next-utterance: (turn, next turn) pairs within each conversation."""
import os
import random

from conftest import run, tool


def write_dialogues(path, conversations=60, seed=0):
    rng = random.Random(seed)
    convs = []
    for c in range(conversations):
        turns = [f"c{c} t{t} " + " ".join(rng.choice("abcdefgh") * rng.randint(1, 3)
                                           for _ in range(rng.randint(3, 8)))
                 for t in range(rng.randint(2, 6))]
        convs.append(turns)
    with open(path, "w") as f:
        f.write("\n\n".join("\n".join(turns) for turns in convs) + "\n")
    return convs


def read_pairs(raw):
    pairs = []
    for split in ("train", "valid", "test"):
        with open(os.path.join(raw, f"{split}.src")) as s, open(os.path.join(raw, f"{split}.tgt")) as t:
            pairs += list(zip(s.read().splitlines(), t.read().splitlines()))
    return pairs


def test_pairs_follow_each_turn_within_its_conversation(tmp_path):
    text = str(tmp_path / "dialogues.txt")
    convs = write_dialogues(text)
    out = str(tmp_path / "out")
    proc = run([tool("fairseq-hash-prepare"), "--next-utterance", "--text", text,
                "--output-dir", out, "--vocab-size", "60", "--valid-pct", "10", "--test-pct", "10",
                "--workers", "1"])
    assert proc.stdout.strip().endswith(os.path.join(out, "data-bin"))
    want = {(a, b) for turns in convs for a, b in zip(turns, turns[1:])}
    got = read_pairs(os.path.join(out, "raw"))
    assert len(got) == len(want) and set(got) == want  # none crosses a blank line

    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    task = TranslationTask.setup_task(TranslationConfig(
        data=os.path.join(out, "data-bin"), source_lang="src", target_lang="tgt",
        dataset_impl="mmap", train_subset="train", required_seq_len_multiple=1))
    for split in ("train", "valid", "test"):
        task.load_dataset(split)
    assert sum(len(task.dataset(s)) for s in ("train", "valid", "test")) == len(want)
    assert task.source_dictionary.symbols == task.target_dictionary.symbols  # joined
