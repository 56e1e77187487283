"""LayerDrop pruning (fairseq's *_layers_to_keep) of hash models: the pruned model's hash
layers are the kept layers that were hash layers, with their tables and experts."""
import os

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, run, tool, user_dir
from models_util import TINY_SEQ2SEQ, seq2seq_data
from test_bad_input import error_line

THREE = ["--decoder-layers", "3", "--hash-layer", "0,-1"]  # hash layers 0 and 2


@pytest.fixture(scope="module")
def lm(data_bin, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("layerdrop"))
    run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN,
         *THREE, "--decoder-layerdrop", "0.2", "--max-update", "6", "--save-dir", save])
    return os.path.join(save, "checkpoint_last.pt")


def load(path, data_bin, **overrides):
    import fairseq_hash  # noqa: F401  (registers the models)
    from fairseq import checkpoint_utils

    [model], _, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": data_bin, **overrides})
    return model.eval(), task


def scores(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


@pytest.mark.parametrize("keep, hash_layers", [("0,2", [0, 1]), ("0,1", [0]), ("1,2", [1])])
def test_the_pruned_lm_is_the_full_one_without_the_left_out_layer(lm, data_bin, keep,
                                                                  hash_layers):
    full, task = load(lm, data_bin)
    pruned, _ = load(lm, data_bin, decoder_layers_to_keep=keep)
    kept = [int(i) for i in keep.split(",")]
    assert sorted(pruned.decoder.moe_layers) == hash_layers
    for new, old in enumerate(kept):
        if new in hash_layers:  # the checkpoint layer's table, where it was a hash layer
            assert torch.equal(pruned.decoder.layers[new].fc1.router.table,
                               full.decoder.layers[old].fc1.router.table)
    full.decoder.layers = torch.nn.ModuleList([full.decoder.layers[i] for i in kept])
    full.decoder.num_layers = len(kept)
    tokens = torch.randint(4, len(task.dictionary), (3, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(scores(pruned, tokens), scores(full, tokens))


def eval_lm(path, data_bin, keep):
    return run([tool("fairseq-eval-lm"), data_bin, "--path", path, "--user-dir", user_dir(),
                "--cpu", "--gen-subset", "valid", "--max-tokens", "512", "--tokens-per-sample", "32",
                "--model-overrides", f"{{'decoder_layers_to_keep': '{keep}'}}"], check=False)


def test_eval_lm_says_which_hash_layer_the_kept_set_leaves_out(lm, data_bin):
    proc = eval_lm(lm, data_bin, "0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "--decoder-layers-to-keep 0,1 leaves out decoder hash layer(s) [2]; the pruned " \
           "model's hash layers are [0]" in out
    assert "Loss (base 2)" in out


def test_keeping_no_hash_layer_is_refused_in_one_line(lm, data_bin):
    line = error_line(eval_lm(lm, data_bin, "1"))
    assert "--decoder-layers-to-keep 1 keeps none of the decoder hash layers [0, 2] " \
           "(--hash-layer)" in line


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerdrop-s2s")
    pairs = seq2seq_data(str(root))
    save = str(root / "ckpt")
    run([tool("fairseq-train"), pairs, "--user-dir", user_dir(), *TINY_SEQ2SEQ, *TINY_TRAIN,
         "--encoder-layers", "3", "--decoder-layers", "3", "--encoder-layerdrop", "0.2",
         "--decoder-layerdrop", "0.2", "--max-update", "6", "--save-dir", save])
    return pairs, os.path.join(save, "checkpoint_last.pt")


def generate(pairs, path, *extra):
    proc = run([tool("fairseq-generate"), pairs, "--user-dir", user_dir(), "--path", path,
                "--beam", "2", "--cpu", "--max-tokens", "1024", "--num-workers", "0", *extra])
    return [l for l in proc.stdout.splitlines() if l.startswith("H-")], proc.stdout + proc.stderr


def test_generate_prunes_both_sides_of_a_translation_model(seq2seq):
    pairs, path = seq2seq
    hyps, out = generate(pairs, path, "--model-overrides",
                         "{'encoder_layers_to_keep': '0,2', 'decoder_layers_to_keep': '0,1'}")
    assert len(hyps) >= 30
    assert "encoder hash layers at [0, 1]" in out and "decoder hash layers at [0]" in out
    assert "--decoder-layers-to-keep 0,1 leaves out decoder hash layer(s) [2]" in out


def test_fine_tuning_a_pruned_lm_trains_the_kept_hash_layers(lm, data_bin, tmp_path):
    # fairseq's own limits here, dense models too: translation's --encoder-layers-to-keep
    # is a list, on which its build stops ('list' object has no attribute 'split'); and a
    # transformer_lm fine-tuned with --decoder-layers-to-keep saves its first
    # --decoder-layers, which fairseq then cannot load (missing keys of layer 2)
    save = str(tmp_path / "pruned")
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, *THREE, "--decoder-layers-to-keep", "1,2", "--finetune-from-model",
                lm, "--max-update", "3", "--save-dir", save])
    out = proc.stdout + proc.stderr
    assert "leaves out decoder hash layer(s) [0]" in out and "decoder hash layers at [1]" in out
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), map_location="cpu",
                       weights_only=False)["model"]
    original = torch.load(lm, map_location="cpu", weights_only=False)["model"]
    # the checkpoint's layer 2, a hash layer, is the pruned model's layer 1; layer 1 dense
    assert torch.equal(state["decoder.layers.1.fc1.router.table"],
                       original["decoder.layers.2.fc1.router.table"])
    assert "decoder.layers.0.fc1.weight" in state and "decoder.layers.2.fc1.weight" not in state
