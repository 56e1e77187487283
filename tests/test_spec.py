"""HashLayerSpec: the hash layers' flags read once from fairseq's args, and checked once."""
import argparse

import pytest

from fairseq_hash.errors import HashConfigError
from fairseq_hash.models.config import EncoderDecoderHashConfig, HashLayerConfig
from fairseq_hash.spec import HashLayerSpec


def test_flags_missing_from_args_take_the_spec_defaults():
    spec = HashLayerSpec.from_args(argparse.Namespace(hash_experts=8, hash_count=2,
                                                      moe_dispatch="fairscale"))
    assert (spec.total_experts, spec.num_hashes, spec.dispatch) == (8, 2, "fairscale")
    assert spec == HashLayerSpec(total_experts=8, num_hashes=2, dispatch="fairscale")


@pytest.mark.parametrize("config", [HashLayerConfig, EncoderDecoderHashConfig])
def test_the_flags_defaults_are_the_specs(config):
    assert HashLayerSpec.from_args(config()) == HashLayerSpec()


def test_the_ddp_backend_is_read_from_argparse_args():
    spec = HashLayerSpec.from_args(argparse.Namespace(ddp_backend="legacy_ddp"))
    assert spec.ddp_backend == "legacy_ddp"


def test_the_default_spec_is_valid():
    HashLayerSpec().validate(ffn_dim=64)


@pytest.mark.parametrize("values, message", [
    (dict(total_experts=-4), "--hash-experts -4: must be at least 2"),
    (dict(topk=0), "--hash-topk 0: must lie in"),
    (dict(topk=-1), "--hash-topk -1: must lie in"),
    (dict(num_hashes=0), "--hash-count 0: must be at least 1"),
    (dict(num_hashes=-2), "--hash-count -2: must be at least 1"),
    (dict(shared_experts=-1), "--hash-shared-experts -1: must be 0 or more"),
    (dict(expert_ffn_dim=-8), "--hash-expert-ffn-dim -8: must be a positive width"),
    (dict(shared_experts=1, shared_ffn_dim=-8), "--hash-shared-ffn-dim -8: must be a positive"),
    (dict(parallel_size=-1), "--moe-expert-parallel-size -1: must be 0"),
    (dict(router="switch", capacity_factor=0.0), "--capacity-factor 0.0: must be positive"),
    (dict(router="moe"), "--router 'moe' is unknown; valid: hash, switch, top2, base"),
    (dict(dispatch="nccl"), "--moe-dispatch 'nccl' is unknown"),
    (dict(router="top2", num_hashes=2), "--hash-count 2 needs --router hash"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(values, message):
    with pytest.raises(HashConfigError, match=message) as error:
        HashLayerSpec(**values).validate(ffn_dim=64)
    assert "\n" not in str(error.value)


def test_multihash_must_divide_the_routed_experts_width():
    HashLayerSpec(num_hashes=4).validate(ffn_dim=64)
    with pytest.raises(HashConfigError, match="--hash-count 3 must divide the FFN width "
                                              "--encoder-ffn-embed-dim 64"):
        HashLayerSpec(num_hashes=3).validate(ffn_dim=64, ffn_flag="--encoder-ffn-embed-dim")
    with pytest.raises(HashConfigError, match="--hash-count 4 must divide the FFN width "
                                              "--hash-expert-ffn-dim 6"):
        HashLayerSpec(num_hashes=4, expert_ffn_dim=6).validate(ffn_dim=64)


@pytest.mark.parametrize("values, world, expected", [
    (dict(total_experts=8), 1, 1),
    (dict(total_experts=8), 4, 4),  # W divides K: K/W experts a rank
    (dict(total_experts=2), 4, 2),  # K divides W: one expert a rank, W/K replicas
    (dict(total_experts=8, parallel_size=2), 4, 2),
])
def test_parallel_size_is_chosen_from_the_world(values, world, expected):
    assert HashLayerSpec(**values).parallel_size_for(world) == expected


@pytest.mark.parametrize("values, world, message", [
    (dict(parallel_size=2), 1, "--moe-expert-parallel-size 2 needs 2 or more ranks"),
    (dict(total_experts=8, parallel_size=3), 6, "--moe-expert-parallel-size 3 must divide both"),
    (dict(total_experts=3), 2, "--hash-experts 3 and a world of 2 ranks"),
    (dict(ddp_backend="slowmo"), 2, "--ddp-backend slowmo cannot keep hash-layer experts"),
    (dict(router="base"), 2, "--router base solves one assignment"),
])
def test_layouts_that_cannot_be_built_are_refused(values, world, message):
    with pytest.raises(HashConfigError, match=message):
        HashLayerSpec(**values).validate(world_size=world)
