"""Loading a checkpoint for offload (offload/loading.py): fairseq's read maps the file,
so a one-file checkpoint larger than memory loads holding only what the model copies."""
import os

import torch
from fairseq import checkpoint_utils
from torch.utils.serialization import config

from hashfns_util import hashfns_data_dir
from test_offload import hub, padded_batch, save_checkpoint, scores
from fairseq_hash.offload.mapped import backing_file, file_mappings


def test_an_offloaded_one_file_checkpoint_is_read_by_mapping_it(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data)
    mapped = checkpoint_utils.load_checkpoint_to_cpu(path, {"hash_offload_experts": "prefetch"})
    mappings = file_mappings()
    files = {backing_file(t, mappings) for t in mapped["model"].values()}
    assert {os.path.realpath(f) for f in files if f} == {os.path.realpath(path)}
    assert None not in files  # every tensor, shared or expert, is a view of the file
    # the read is changed for that call only
    assert not config.load.mmap and "open" not in vars(checkpoint_utils)
    plain = checkpoint_utils.load_checkpoint_to_cpu(path)
    assert {backing_file(t) for t in plain["model"].values()} == {None}
    assert plain["model"].keys() == mapped["model"].keys()
    assert all(torch.equal(plain["model"][k], mapped["model"][k]) for k in plain["model"])


def test_a_model_loaded_from_the_mapped_read_scores_as_the_resident_one(tmp_path):
    data = hashfns_data_dir(str(tmp_path / "data"))
    path = save_checkpoint(str(tmp_path / "ckpt"), data, "--hash-type", "bigram")
    resident = hub(path, data)
    batch = padded_batch(resident.task.dictionary, [9, 5, 7])
    lm = hub(path, data, hash_offload_experts="demand", hash_expert_cache="2")
    assert torch.equal(scores(lm, batch), scores(resident, batch))
