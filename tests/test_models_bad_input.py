"""Bad hash-layer flags on the encoder models: one line, nothing written."""
import os

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, run, tool, user_dir
from models_util import TINY_SEQ2SEQ, seq2seq_data
from test_bad_input import error_line


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return seq2seq_data(str(tmp_path_factory.mktemp("pairs")), lines=100)


def assert_nothing_written(save):
    assert not os.path.exists(save) or os.listdir(save) == []


@pytest.mark.parametrize("flag", ["--encoder-hash-layer", "--decoder-hash-layer"])
def test_encoder_decoder_flags_on_a_decoder_only_model_are_refused(data_bin, tmp_path, flag):
    save = str(tmp_path / "ckpt")
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, "--max-update", "5", "--save-dir", save, flag, "0"], check=False)
    line = error_line(proc)
    assert f"{flag} is for --arch hash_transformer or hash_roberta" in line
    assert "name its hash layers with --hash-layer" in line
    assert_nothing_written(save)


@pytest.mark.parametrize("flags, expected", [
    (["--encoder-hash-layer", "2"],
     "--encoder-hash-layer 2 is outside the model: with --encoder-layers 2 valid indices are -2..1"),
    (["--decoder-hash-layer", "-3"],
     "--decoder-hash-layer -3 is outside the model: with --decoder-layers 2 valid indices"),
    (["--encoder-hash-layer", "last"], "--encoder-hash-layer 'last': expected comma-separated"),
    (["--encoder-hash-layer", "", "--decoder-hash-layer", ""],
     "--encoder-hash-layer and --decoder-hash-layer name no layer"),
])
def test_a_hash_layer_outside_the_model_is_refused(pairs, tmp_path, flags, expected):
    save = str(tmp_path / "ckpt")
    proc = run([tool("fairseq-train"), pairs, "--user-dir", user_dir(), *TINY_SEQ2SEQ, *TINY_TRAIN,
                "--max-update", "5", "--save-dir", save, *flags], check=False)
    assert expected in error_line(proc)
    assert_nothing_written(save)
