"""fairseq's tools on a top-2 hash LM with softmax scores, a shared expert and a tid2eid table."""
import os
import re

import pytest
import torch
from fairseq.data import Dictionary

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from test_bad_input import error_line

TOP2 = ["--hash-topk", "2", "--hash-score", "softmax", "--hash-shared-experts", "1",
        "--hash-shared-ffn-dim", "32"]


def tid2eid_file(data_bin, path, rows=None, seed=0):
    """A random token -> 2 distinct experts table of 4, saved as a .pt file."""
    rows = rows or len(Dictionary.load(os.path.join(data_bin, "dict.txt")))
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(rows, 4, generator=gen).argsort(dim=1)[:, :2].int()
    torch.save({"tid2eid": table}, path)
    return str(path), table.long()


@pytest.fixture(scope="module")
def top2(tmp_path_factory, data_bin):
    """(save_dir, log, tid2eid) of 40 updates; the table file is removed afterwards."""
    root = tmp_path_factory.mktemp("top2")
    path, table = tid2eid_file(data_bin, root / "tid2eid.pt")
    save = str(root / "ckpt")
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, *TOP2, "--hash-file", path, "--max-update", "40",
                "--save-dir", save])
    os.remove(path)  # the checkpoint carries the table
    return save, proc.stdout + proc.stderr, table


def load_model(save, data_bin):
    from fairseq import checkpoint_utils

    import fairseq_hash  # noqa: F401  (registers the model)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(save, "checkpoint_last.pt")], arg_overrides={"data": data_bin})
    return models[0].eval(), task


def test_top2_with_scores_and_a_shared_expert_trains(top2):
    _, log, _ = top2
    losses = [row["loss"] for row in json_logs(log, "train_inner")]
    assert len(losses) >= 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0


def test_a_tid2eid_table_round_trips_into_the_checkpoint(top2, data_bin):
    save, _, table = top2
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), map_location="cpu",
                       weights_only=False)
    tables = [v for k, v in state["model"].items() if k.endswith("router.table")]
    assert len(tables) == 2 and all(torch.equal(t, table) for t in tables)
    model, _ = load_model(save, data_bin)  # the file is gone: the checkpoint's table serves
    tokens = torch.randint(4, len(model.decoder.dictionary), (2, 9))
    with torch.no_grad():
        model(tokens)
    for moe in model.decoder.moe_layers.values():
        assert torch.equal(moe.last_indices, table[tokens.t().reshape(-1)])
        assert moe.router.gate.weight.abs().sum() > 0  # the gate has learned


def test_eval_lm_scores_the_top2_model(top2, data_bin, tmp_path):
    save, _, _ = top2
    proc = run([tool("fairseq-eval-lm"), data_bin, "--path", os.path.join(save, "checkpoint_last.pt"),
                "--user-dir", user_dir(), "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512",
                "--gen-subset", "test", "--num-workers", "0"], cwd=str(tmp_path))
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", proc.stdout + proc.stderr).group(1))
    assert 0 < loss < 6.9  # log2 of the 120-word vocabulary: it learned something


def test_incremental_decoding_of_the_trained_top2_model_equals_the_full_forward(top2, data_bin):
    model, _ = load_model(top2[0], data_bin)
    tokens = torch.randint(4, len(model.decoder.dictionary), (2, 10))
    tokens[:, 0] = model.decoder.dictionary.eos()
    with torch.no_grad():
        full, _ = model(tokens)
        state, steps = {}, []
        for t in range(tokens.size(1)):
            steps.append(model.decoder(tokens[:, : t + 1], incremental_state=state)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_the_routing_report_counts_both_slots_of_every_token(top2, data_bin, tmp_path):
    from fairseq_hash.cli.report import report

    result = report(os.path.join(top2[0], "checkpoint_last.pt"), data_bin, str(tmp_path / "r"))
    for entry in result["layers"].values():
        assert sum(entry["tokens"]) == 2 * result["tokens"]
        assert len(entry["per_slot"]) == 2


def test_training_refuses_a_tid2eid_of_another_vocabulary_in_one_line(data_bin, tmp_path):
    size = len(Dictionary.load(os.path.join(data_bin, "dict.txt")))
    path, _ = tid2eid_file(data_bin, tmp_path / "t.pt", rows=size + 8)
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, *TOP2, "--hash-file", path, "--max-update", "1",
                "--save-dir", str(tmp_path / "ckpt")], check=False)
    assert error_line(proc) == (
        f"fairseq-hash: error: --hash-file {path}: tid2eid has {size + 8} rows but the "
        f"dictionary has {size} symbols (dict.txt plus fairseq's specials and fillers); one row "
        f"per dictionary index is needed")
    assert not os.path.exists(tmp_path / "ckpt" / "checkpoint_last.pt")


def test_two_ranks_train_the_top2_model_one_rank_trains_with_update_freq_2(data_bin, tmp_path):
    from test_expert_parallel import losses, train_on_one_rank, train_on_two_ranks

    # two experts a rank: each token's two slots and their scores cross the all-to-all
    one = losses(train_on_one_rank(data_bin, str(tmp_path / "one"), *TOP2, "--max-epoch", "1"))
    two = losses(train_on_two_ranks(data_bin, str(tmp_path / "two"), *TOP2, "--max-epoch", "1"))
    assert len(two) >= 5 and two == one[:len(two)]


def test_checkpoint_activations_train_the_top2_model_alike(data_bin, tmp_path):
    def train(name, *extra):
        proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                    *TINY_TRAIN, *TOP2, "--max-update", "10", "--log-interval", "1",
                    "--save-dir", str(tmp_path / name), *extra])
        return [row["loss"] for row in json_logs(proc.stdout + proc.stderr, "train_inner")]

    # the layer is recomputed in backward: the gate's scores with it, from the same route
    plain = train("plain")
    assert len(plain) == 10 and train("recomputed", "--checkpoint-activations") == plain
