"""Checkpoints written by an earlier version load and evaluate to the numbers it printed.

The three tiny hash language models in tests/fixtures/old_checkpoints/ were
trained and evaluated by the plugin as of commit a16f48f (before the
restructuring of issue 17); ``build.py`` there rebuilds them and says how.
They cover top-k routing with a learned score, shared and narrow routed
experts; MultiHash with a bigram hash; and a learned (switch) router.
"""
import json
import os

import pytest

from conftest import run, tool, user_dir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "old_checkpoints")
DATA = os.path.join(FIXTURES, "data-bin")
with open(os.path.join(FIXTURES, "expected.json")) as f:
    EXPECTED = json.load(f)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_checkpoint_evaluates_to_the_recorded_perplexity(name):
    proc = run([tool("fairseq-eval-lm"), DATA, "--path", os.path.join(FIXTURES, f"{name}.pt"),
                "--user-dir", user_dir(), "--cpu", "--gen-subset", "test", "--max-tokens", "512",
                "--tokens-per-sample", "32"])
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "Perplexity:" in l)
    assert line[line.index("Loss (base 2)"):].strip() == EXPECTED[name]["eval_lm"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_checkpoint_gives_the_recorded_log_probabilities(name):
    import torch
    import fairseq_hash  # noqa: F401  (registers the models)
    from fairseq import checkpoint_utils

    [model], _, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(FIXTURES, f"{name}.pt")], arg_overrides={"data": DATA})
    model.eval()
    task.load_dataset("test")
    # as build.py computed it: 4 rows of the test split, next-token log-probabilities
    rows = [task.dataset("test")[i]["source"][:16] for i in range(4)]
    n = min(len(r) for r in rows)
    tokens = torch.stack([r[:n] for r in rows])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0].double()
    logprob = float(logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).sum())
    # recorded on one thread: other thread counts sum float32 products in another
    # order (about 4e-9 relative here); an expert or a route changed moves it by far more
    assert logprob == pytest.approx(EXPECTED[name]["logprob"], rel=1e-7)
