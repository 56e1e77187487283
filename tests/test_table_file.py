"""Table files: fairseq-hash-table writes them, --hash-file trains with them."""
import json
import os
import re

import pytest
import torch
from fairseq.data import Dictionary

from hashfns_util import (hashfns_corpus, hashfns_dictionary, hashfns_run, hashfns_train,
                          hashfns_user_dir, HASHFNS_TINY)
from fairseq_hash.errors import HashConfigError
from fairseq_hash.hashing import build_hash_function
from fairseq_hash.moe_factory import build_hash_moe
from fairseq_hash.spec import HashLayerSpec
from fairseq_hash.table_file import load_table_file, read_table_file, save_table_file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return hashfns_corpus(str(tmp_path_factory.getbasetemp() / "hashfns_corpus"))


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, corpus):
    return hashfns_train(corpus, str(tmp_path_factory.getbasetemp() / "hashfns_trained"))


def saved(tmp_path, name="bigram", d=None, experts=4, hashes=2):
    d = d or hashfns_dictionary()
    table = build_hash_function(name, experts).build_table(d, experts, hashes, seed=3)
    path = str(tmp_path / "table.json")
    save_table_file(path, table, name, experts, d, source="a test")
    return path, table, d


def test_round_trip_keeps_table_and_fields(tmp_path):
    path, table, d = saved(tmp_path)
    assert torch.equal(load_table_file(path, d, "bigram", 4, 2), table)
    doc = read_table_file(path)
    assert (doc["type"], doc["num_experts"], doc["num_hashes"]) == ("bigram", 4, 2)
    assert doc["dictionary_size"] == len(d) and doc["source"] == "a test"


def test_other_dictionary_is_refused_naming_the_file(tmp_path):
    path, _, d = saved(tmp_path)
    other = hashfns_dictionary()
    other.add_symbol("extra")
    with pytest.raises(HashConfigError, match=f"--hash-file {path} was built for another dictionary"):
        load_table_file(path, other, "bigram", 4, 2)


def test_other_expert_count_is_refused_naming_the_file(tmp_path):
    path, _, d = saved(tmp_path)
    with pytest.raises(HashConfigError, match=f"--hash-file {path} was built for 4 experts.*8"):
        load_table_file(path, d, "bigram", 8, 2)


def test_other_type_or_hash_count_is_refused(tmp_path):
    path, _, d = saved(tmp_path)
    with pytest.raises(HashConfigError, match="holds a 'bigram' table"):
        load_table_file(path, d, "balanced", 4, 2)
    with pytest.raises(HashConfigError, match="--hash-count is 1"):
        load_table_file(path, d, "bigram", 4, 1)


def test_hand_made_table_with_bad_entries_is_refused(tmp_path):
    path, _, d = saved(tmp_path, "random", hashes=1)
    doc = read_table_file(path)
    doc["table"][5] = [9]
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(HashConfigError, match=r"entries must lie in \[0, 4\)"):
        load_table_file(path, d, "random", 4, 1)
    with pytest.raises(HashConfigError, match="no such file"):
        load_table_file(str(tmp_path / "missing.json"), d, "random", 4, 1)


def test_hash_file_routes_every_layer_by_the_file(tmp_path):
    path, table, d = saved(tmp_path, "random", hashes=1)
    spec = HashLayerSpec(total_experts=4, hash_type="random", hash_file=path)
    for layer in (0, 1):
        assert torch.equal(build_hash_moe(spec, d, layer, 8, 16).router.table, table)


def test_cli_builds_balanced_from_a_data_bin(tmp_path, corpus):
    out = str(tmp_path / "balanced.json")
    hashfns_run(["fairseq-hash-table", "balanced", "--data", corpus, "--experts", 4, "--output", out])
    d = Dictionary.load(f"{corpus}/dict.txt")
    want = build_hash_function("balanced").build_table(d, 4, 1, seed=1)
    assert torch.equal(load_table_file(out, d, "balanced", 4, 1), want)
    printed = hashfns_run(["fairseq-hash-table", "fingerprint", "--data", corpus]).stdout.strip()
    assert printed == read_table_file(out)["dictionary_fingerprint"]


def test_cli_clusters_a_checkpoints_embeddings_and_trains_with_it(tmp_path, corpus,
                                                                   trained_checkpoint):
    out = str(tmp_path / "dispersed.json")
    hashfns_run(["fairseq-hash-table", "dispersed", "--checkpoint", trained_checkpoint,
                 "--experts", 4, "--output", out])
    doc = read_table_file(out)
    assert doc["type"] == "dispersed" and doc["num_experts"] == 4
    save = str(tmp_path / "ckpt")
    ckpt = hashfns_train(corpus, save, "--hash-type", "dispersed", "--hash-file", out, updates=2)
    state = torch.load(ckpt, weights_only=False)
    assert torch.equal(state["model"]["decoder.layers.1.fc1.router.table"],
                       torch.tensor(doc["table"]))


def test_training_with_a_file_for_other_experts_fails_in_one_line(tmp_path, corpus):
    out = str(tmp_path / "random8.json")
    hashfns_run(["fairseq-hash-table", "random", "--data", corpus, "--experts", 8, "--output", out])
    error = training_error(corpus, tmp_path, "--hash-type", "random", "--hash-file", out)
    assert f"--hash-file {out} was built for 8 experts" in error


def training_error(corpus, tmp_path, *flags):
    """The one error line of a fairseq-train run that must fail."""
    proc = hashfns_run(["fairseq-train", corpus, "--user-dir", hashfns_user_dir(), *HASHFNS_TINY,
                        *flags, "--max-update", 1, "--save-dir", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    return errors[0]


def test_cli_refuses_missing_inputs_in_one_line(tmp_path):
    proc = hashfns_run(["fairseq-hash-table", "clustered", "--experts", 4, "--output",
                        str(tmp_path / "c.json")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "fairseq-hash-table: error: clustered tables need --checkpoint (a trained model)"


def test_a_checkpoint_trained_with_a_file_loads_after_the_file_is_gone(tmp_path, corpus):
    out = str(tmp_path / "random.json")
    hashfns_run(["fairseq-hash-table", "random", "--data", corpus, "--experts", 4,
                 "--output", out, "--seed", 5])
    ckpt = hashfns_train(corpus, str(tmp_path / "ckpt"), "--hash-type", "random",
                         "--hash-file", out, updates=2)
    before = hashfns_run(["fairseq-eval-lm", corpus, "--path", ckpt, "--user-dir",
                          hashfns_user_dir(), "--cpu", "--tokens-per-sample", "32"]).stderr
    os.rename(out, out + ".moved")
    after = hashfns_run(["fairseq-eval-lm", corpus, "--path", ckpt, "--user-dir",
                         hashfns_user_dir(), "--cpu", "--tokens-per-sample", "32"]).stderr
    loss = re.compile(r"Loss \(base 2\): ([0-9.]+)")
    assert loss.search(after) and loss.search(after).group(1) == loss.search(before).group(1)


def test_training_from_scratch_with_a_missing_file_fails_in_one_line_and_writes_nothing(
        tmp_path, corpus):
    missing = str(tmp_path / "missing.json")
    error = training_error(corpus, tmp_path, "--hash-type", "random", "--hash-file", missing)
    assert f"--hash-file {missing}: no such file" in error
    # fairseq-train makes the (empty) save dir before any plugin code runs
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert written == []


def test_a_checkpoint_trained_with_a_file_resumes_training_after_the_file_is_gone(
        tmp_path, corpus):
    out = str(tmp_path / "random.json")
    hashfns_run(["fairseq-hash-table", "random", "--data", corpus, "--experts", 4,
                 "--output", out])
    save = str(tmp_path / "ckpt")
    ckpt = hashfns_train(corpus, save, "--hash-type", "random", "--hash-file", out, updates=2)
    os.remove(out)
    hashfns_run(["fairseq-train", corpus, "--user-dir", hashfns_user_dir(), *HASHFNS_TINY,
                 "--hash-type", "random", "--hash-file", out, "--max-update", 4,
                 "--save-dir", save])
    state = torch.load(ckpt, weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4


def test_a_table_awaiting_its_checkpoint_takes_the_modules_device(tmp_path):
    path, table, d = saved(tmp_path, "random", hashes=1)
    spec = HashLayerSpec(total_experts=4, hash_type="random", hash_file=path)
    state = {f"r.{k}": v for k, v in build_hash_moe(spec, d, 0, 8, 16).router.state_dict().items()}
    os.remove(path)
    router = build_hash_moe(spec, d, 0, 8, 16).router
    # "meta" stands for an accelerator (the checkpoint is read onto the CPU);
    # only the table moves, the fingerprints stay readable
    router.table = router.table.to("meta")
    router.upgrade_state_dict_named(state, "r")
    assert router.table.device.type == "meta" and router.table.shape == table.shape
