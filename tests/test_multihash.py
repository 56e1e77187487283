"""MultiHash (--hash-count N): N hashes, each choosing one segment of the FFN."""
import os

import pytest
import torch

from hashfns_util import (HASHFNS_TINY, hashfns_corpus, hashfns_data_dir, hashfns_dictionary,
                          hashfns_model, hashfns_multihash_checkpoint, hashfns_run, hashfns_tokens,
                          hashfns_user_dir)
from fairseq_hash.errors import HashConfigError
from fairseq_hash.experts import ExpertFFN
from fairseq_hash.hashing import RouteInputs
from fairseq_hash.moe_factory import build_hash_moe
from fairseq_hash.multihash import MultiHashRouter, SegmentedExpertFFN
from fairseq_hash.routers import HashRouter
from fairseq_hash.spec import HashLayerSpec


def layer_spec(**kw):
    return HashLayerSpec(**{"total_experts": 4, "hash_type": "random", **kw})


def test_count_one_is_exactly_the_plain_hash_layer(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    plain, d = hashfns_model(data)
    one, _ = hashfns_model(data, "--hash-count", 1)
    layer = one.decoder.moe_layers[1]
    assert type(layer.router) is HashRouter and type(layer.experts) is ExpertFFN
    a, b = plain.state_dict(), one.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = hashfns_tokens(d)
    with torch.no_grad():
        torch.testing.assert_close(one(tokens)[0], plain(tokens)[0], rtol=0, atol=0)


def test_two_hashes_have_the_parameters_of_one(tmp_path):
    data = hashfns_data_dir(str(tmp_path))
    one, _ = hashfns_model(data, "--hash-count", 1, "--hash-type", "balanced")
    two, _ = hashfns_model(data, "--hash-count", 2, "--hash-type", "balanced")
    shapes = lambda m: {k: p.shape for k, p in m.named_parameters()}  # noqa: E731
    assert shapes(one) == shapes(two)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in two.parameters())
    assert isinstance(two.decoder.moe_layers[1].router, MultiHashRouter)
    assert two.decoder.moe_layers[1].router.table.shape == (len(two.decoder.dictionary), 2)


def reference_multihash(x, experts: SegmentedExpertFFN, chosen):
    """The definition, token by token: segment m of expert chosen[s, m], concatenated."""
    n = experts.num_hashes
    f = experts.fc1_weight.size(1)
    width = f // n
    out = []
    for s in range(x.size(0)):
        hidden, w2 = [], []
        for m in range(n):
            e, rows = int(chosen[s, m]), slice(m * width, (m + 1) * width)
            hidden.append(torch.relu(experts.fc1_weight[e, rows] @ x[s] + experts.fc1_bias[e, rows]))
            w2.append(experts.fc2_weight[e][:, rows])
        y = torch.cat(w2, 1) @ torch.cat(hidden) + experts.fc2_bias[int(chosen[s, 0])]
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("count", [2, 4])
def test_segments_concatenate_before_fc2(count):
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(num_hashes=count), d, 0, 8, 16)
    tokens = torch.randint(d.nspecial, len(d), (2, 5))
    x = torch.randn(5, 2, 8)  # [T, B, d]
    with torch.no_grad():
        y = moe(x, RouteInputs.from_tokens(tokens, d.pad(), d.eos()))
    chosen = moe.router.table[tokens.t().reshape(-1)]  # [T*B, N] time-major
    assert chosen.unique(dim=0).size(0) > 1
    want = reference_multihash(x.reshape(-1, 8), moe.experts, chosen)
    torch.testing.assert_close(y.reshape(-1, 8), want, rtol=1e-5, atol=1e-5)


def test_gradients_equal_those_of_the_per_token_definition():
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(num_hashes=2), d, 0, 8, 16)
    tokens = torch.randint(d.nspecial, len(d), (2, 5))
    x = torch.randn(5, 2, 8, requires_grad=True)
    weights = [x, *moe.experts.parameters()]
    y = moe(x, RouteInputs.from_tokens(tokens, d.pad(), d.eos()))
    grads = torch.autograd.grad((y * y).sum(), weights)
    chosen = moe.router.table[tokens.t().reshape(-1)]
    want = reference_multihash(x.reshape(-1, 8), moe.experts, chosen)
    want_grads = torch.autograd.grad((want * want).sum(), weights)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fc2_segments_are_views_of_fc2_not_a_copy():
    experts = SegmentedExpertFFN(4, 8, 16, num_hashes=2)
    w1, _, w2, _ = experts.segments()
    assert w1.data_ptr() == experts.fc1_weight.data_ptr()
    assert w2.data_ptr() == experts.fc2_weight.data_ptr()
    assert w2[1, 1].equal(experts.fc2_weight[1][:, 8:])  # expert 1, segment 1: its columns


def test_a_dense_ffn_loaded_into_every_expert_gives_the_dense_output():
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(num_hashes=2), d, 0, 8, 16)
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    moe.experts.load_dense(fc1, fc2)
    tokens = torch.randint(d.nspecial, len(d), (2, 5))
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        y = moe(x, RouteInputs.from_tokens(tokens, d.pad(), d.eos()))
        torch.testing.assert_close(y, fc2(torch.relu(fc1(x))), rtol=1e-5, atol=1e-5)


def test_changing_one_segments_hash_changes_the_output():
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(num_hashes=2), d, 0, 8, 16)
    tokens = torch.tensor([[7, 8, 7, 9]])
    route = RouteInputs.from_tokens(tokens, d.pad(), d.eos())
    x = torch.randn(4, 1, 8)
    with torch.no_grad():
        before = moe(x, route).clone()
        moe.router.table[7, 1] = (moe.router.table[7, 1] + 1) % 4  # token 7, hash 1 only
        after = moe(x, route)
    changed = (after - before).abs().amax(-1)[:, 0] > 1e-6  # [T]
    assert changed.tolist() == [True, False, True, False]


def test_gradients_flow_to_each_chosen_segment_only():
    d = hashfns_dictionary()
    moe = build_hash_moe(layer_spec(num_hashes=2), d, 0, 8, 16)
    moe.router.table.zero_()
    moe.router.table[:, 1] = 3  # every token: segment 0 of expert 0, segment 1 of expert 3
    tokens = torch.randint(d.nspecial, len(d), (2, 5))
    moe(torch.randn(5, 2, 8), RouteInputs.from_tokens(tokens, d.pad(), d.eos())).sum().backward()
    g = moe.experts.fc1_weight.grad  # [K, f, d]
    assert g[0, :8].abs().sum() > 0 and g[0, 8:].abs().sum() == 0
    assert g[3, 8:].abs().sum() > 0 and g[3, :8].abs().sum() == 0
    assert g[1].abs().sum() == 0 and g[2].abs().sum() == 0
    assert moe.experts.fc2_bias.grad[3].abs().sum() == 0  # fc2's bias comes with segment 0


def test_width_that_does_not_divide_is_a_clear_error():
    with pytest.raises(HashConfigError, match="--hash-count 3 must divide.*16"):
        layer_spec(num_hashes=3).validate(ffn_dim=16)
    with pytest.raises(HashConfigError, match="--hash-count 0"):
        layer_spec(num_hashes=0).validate(ffn_dim=16)


def test_hashes_of_multihash_are_different_tables():
    d = hashfns_dictionary(200)
    for name in ("random", "balanced", "previous", "position"):
        moe = build_hash_moe(layer_spec(hash_type=name, num_hashes=2, total_experts=8), d, 0, 8, 16)
        table = moe.router.table
        assert not torch.equal(table[:, 0], table[:, 1]), name


def test_a_multihash_checkpoint_resumes_and_refuses_another_count(tmp_path_factory, tmp_path):
    import shutil

    corpus = hashfns_corpus(str(tmp_path_factory.getbasetemp() / "hashfns_corpus"))
    ckpt = hashfns_multihash_checkpoint(tmp_path_factory.getbasetemp(), corpus)
    flags = ["fairseq-train", corpus, "--user-dir", hashfns_user_dir(), *HASHFNS_TINY,
             "--hash-type", "bigram", "--hash-layer", "0,1", "--max-update", 4]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.dirname(ckpt), resumed)
    proc = hashfns_run([*flags, "--hash-count", 2, "--save-dir", resumed])
    assert "num_updates 4" in proc.stderr + proc.stdout or '"num_updates": "4"' in proc.stderr + proc.stdout
    other = str(tmp_path / "other")
    shutil.copytree(os.path.dirname(ckpt), other)
    proc = hashfns_run([*flags, "--hash-count", 1, "--save-dir", other], check=False)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fairseq-hash: error:")]
    assert errors == ["fairseq-hash: error: the checkpoint has 2 hash(es) in decoder hash layer 0 but "
                      "--hash-count is 1; use the checkpoint's value"]
