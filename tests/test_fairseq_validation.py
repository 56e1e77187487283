"""What fairseq's validation covers: the fact behind the note in docs/fairseq-notes.md and compare's captions."""
import os
import re

from conftest import json_logs, run, tool, user_dir

FLAGS = ["--task", "language_modeling", "--tokens-per-sample", "32", "--max-tokens", "512",
         "--cpu", "--num-workers", "0"]


def validate(data_bin, ckpt, *extra):
    out = run([tool("fairseq-validate"), data_bin, "--path", ckpt, "--user-dir", user_dir(),
               *FLAGS, "--log-format", "json", *extra]).stdout
    return json_logs(out, "valid")[-1]


def test_validation_drops_a_last_batch_that_is_not_a_multiple_of_8_and_eval_lm_scores_it(
        data_bin, trained):
    ckpt = os.path.join(trained[0], "checkpoint_last.pt")
    everything = validate(data_bin, ckpt, "--required-batch-size-multiple", "1")
    default = validate(data_bin, ckpt)
    blocks = int(everything["valid_bsz"])
    assert blocks % 8 != 0  # the corpus leaves a last batch to drop
    assert int(default["valid_bsz"]) == blocks - blocks % 16  # batches of 512 / 32 = 16 blocks
    assert default["valid_wpb"] < everything["valid_wpb"]
    out = run([tool("fairseq-eval-lm"), data_bin, "--path", ckpt, "--user-dir", user_dir(),
               *FLAGS, "--gen-subset", "valid"])
    text = out.stdout + out.stderr
    scored = int(re.search(r"Evaluated ([\d,]+) tokens", text).group(1).replace(",", ""))
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", text).group(1))
    assert scored == int(everything["valid_wpb"])
    assert abs(loss - everything["valid_loss"]) < 0.002  # both print 3 or 4 decimals
