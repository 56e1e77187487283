"""Checkpoints record the --hash-type of their tables."""
import pytest
import torch

from hashfns_util import hashfns_data_dir, hashfns_model, hashfns_tokens
from fairseq_hash.errors import HashConfigError


def test_loading_a_table_of_another_hash_type_is_refused(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    balanced, _ = hashfns_model(data, "--hash-type", "balanced")
    random, _ = hashfns_model(data, "--hash-type", "random")
    with pytest.raises(HashConfigError, match="trained with --hash-type balanced but "
                                              "--hash-type is random"):
        random.load_state_dict(balanced.state_dict())


def test_a_checkpoint_from_before_the_type_was_recorded_still_loads(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    saved, d = hashfns_model(data, "--hash-type", "random", "--hash-seed", "5")
    old = {k: v for k, v in saved.state_dict().items() if not k.endswith("hash_type_id")}
    assert len(old) < len(saved.state_dict())
    loaded, _ = hashfns_model(data, "--hash-type", "random")
    loaded.load_state_dict(old)
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], saved(tokens)[0], rtol=0, atol=0)
