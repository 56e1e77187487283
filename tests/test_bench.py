"""fairseq-hash-bench runs at a tiny size, writes valid JSON, and compares
implementations that compute the same thing. No timing is asserted."""
import json
import subprocess
import sys

import pytest
import torch

from fairseq_hash.cli.bench import layer as bench_layer, layer_cases, main as bench

TINY = ["--tokens", "64", "--experts", "2", "4", "--embed-dim", "8", "--ffn-dim", "16",
        "--repeat", "1", "--threads", "1"]
CPU = torch.device("cpu")


def test_layer_benchmark_writes_a_json_row_per_implementation_and_size(tmp_path):
    path = tmp_path / "bench.json"
    bench.run(TINY + ["--json", str(path)])
    rows = json.loads(path.read_text())
    for row in rows:
        assert {"impl", "experts", "tokens", "ms", "peak_mb"} <= set(row)
        assert row["ms"] > 0 and row["tokens"] == 64
        assert row["peak_mb"] is None or row["peak_mb"] >= 0
    expected = {"dense", "floor", "hash", "naive", "fairscale"} | set(layer_cases.LEARNED_ROUTERS)
    for K in (2, 4):
        assert {r["impl"] for r in rows if r["experts"] == K} >= expected


def outputs_and_expert_grads(impl, S, d):
    impl.step()
    outputs, _ = impl.run()
    module = impl.modules[0]
    if hasattr(module, "experts") and hasattr(module.experts, "fc1_weight"):  # MoELayer
        grads = [module.experts.fc1_weight.grad, module.experts.fc2_bias.grad]
    else:
        experts = module.experts
        grads = [torch.stack([e.fc1.weight.grad for e in experts]),
                 torch.stack([e.fc2.bias.grad for e in experts])]
    return outputs[0].detach().reshape(S, d), grads, impl.inputs[0].grad.reshape(S, d)


def test_hash_naive_and_fairscale_route_and_compute_alike():
    S, K, d, f = 96, 4, 8, 16
    built, notes = layer_cases.build_case(["hash", "naive", "fairscale"], S, K, d, f,
                                          torch.float32, CPU)
    assert not notes
    ref = outputs_and_expert_grads(built["hash"], S, d)
    for name in ("naive", "fairscale"):
        got = outputs_and_expert_grads(built[name], S, d)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(got[1], ref[1]):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_hash_activation_memory_does_not_grow_with_experts():
    saved = []
    for K in (2, 16):
        built, _ = layer_cases.build_case(["hash"], 256, K, 16, 32, torch.float32, CPU)
        saved.append(bench_layer.measure_memory(built["hash"], CPU)[1])
    assert saved[0] == saved[1] > 0


def test_a_router_that_cannot_be_built_is_skipped_with_a_note(monkeypatch):
    from fairseq_hash import routers

    def unavailable(name, *args):
        raise LookupError(f"no {name} router here")

    monkeypatch.setattr(routers, "build_learned_router", unavailable)
    built, notes = layer_cases.build_case(["hash", "switch"], 32, 2, 8, 16, torch.float32, CPU)
    assert "hash" in built and "switch" not in built and "switch" in notes["switch"]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    from fairseq_hash.cli.data.prepare import prepare

    return prepare(str(tmp_path_factory.mktemp("bench_data")), max_lines=300)


@pytest.mark.integration  # runs fairseq-train inside bench.run
def test_train_mode_reports_words_per_second_for_dense_and_hash_with_each_optimizer(
        tmp_path, data_bin):
    path = tmp_path / "train.json"
    bench.run(["--train", "--experts", "2", "--tokens", "256", "--embed-dim", "16",
               "--ffn-dim", "32", "--layers", "2", "--updates", "3", "--warmup-updates", "1",
               "--repeat", "1", "--data-bin", data_bin, "--work-dir", str(tmp_path / "work"),
               "--impls", "hash", "--optimizer", "adam", "fused_adamw", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [(r["impl"], r["optimizer"]) for r in rows] == [
        ("train-dense", "adam"), ("train-hash", "adam"),
        ("train-dense", "fused_adamw"), ("train-hash", "fused_adamw")]
    assert rows[0]["x_dense"] == rows[2]["x_dense"] == 1.0
    for row in rows:
        assert row["ms"] > 0 and row["wps"] > 0 and row["peak_mb"] > 0


def test_a_learned_router_is_benchmarked_with_gradients_reaching_its_gate(monkeypatch):
    from fairseq_hash import routers

    class SwitchRouter(torch.nn.Module):  # the shape a learned router is expected to have
        def __init__(self, embed_dim, total_experts, capacity_factor=1.0):
            super().__init__()
            self.gate = torch.nn.Linear(embed_dim, total_experts)

        def forward(self, x, route):
            weight, index = self.gate(x).softmax(-1).max(-1)
            return routers.RouterOutput(indices=index[:, None], weights=weight[:, None])

    monkeypatch.setattr(routers, "SwitchRouter", SwitchRouter, raising=False)
    built, notes = layer_cases.build_case(["switch"], 32, 4, 8, 16, torch.float32, CPU)
    assert not notes
    built["switch"].step()
    assert built["switch"].modules[0].router.gate.weight.grad is not None


def test_bfloat16_layer_benchmark_runs_hash_and_notes_fairscales_float32_cast(tmp_path, caplog):
    path = tmp_path / "bf16.json"
    bench.run(["--tokens", "64", "--experts", "2", "--embed-dim", "8", "--ffn-dim", "16",
               "--repeat", "1", "--threads", "1", "--dtype", "bfloat16",
               "--impls", "dense", "hash", "fairscale", "--json", str(path)])
    impls = [r["impl"] for r in json.loads(path.read_text())]
    assert impls == ["dense", "hash"]  # fairscale casts its dispatch mask to float32
    assert "skipped fairscale" in caplog.text


def test_train_phases_benchmark_prints_each_phase_of_an_update(data_bin):
    out = subprocess.run(
        [sys.executable, "-m", "fairseq_hash.cli.bench.phases", data_bin,
         "--arch", "hash_transformer_lm", "--hash-experts", "2",
         "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--max-tokens", "256",
         "--updates", "3", "--skip", "1"],
        capture_output=True, text=True, check=True).stdout
    assert "parameters; median ms:" in out
    for phase in ("fwd+bwd", "optimizer", "clip", "zero_grad", "update"):
        assert f"{phase} " in out


def test_cpu_peak_memory_holds_both_hidden_activations_of_a_dense_ffn():
    S, f = 1024, 256
    built, _ = layer_cases.build_case(["dense"], S, 2, 64, f, torch.float32, CPU)
    built["dense"].step()
    peak_mb, _ = bench_layer.measure_memory(built["dense"], CPU)
    # fc1's output and relu's output ([S, f] float32 each) are alive together
    assert peak_mb >= 2 * S * f * 4 / 2**20


@pytest.mark.integration  # starts 2 ranks inside bench.run
def test_two_rank_layer_benchmark_times_both_exchanges_and_counts_the_traffic(tmp_path):
    out = tmp_path / "ranks.json"
    rows = bench.run(["--ranks", "2", "--experts", "4", "--tokens", "32", "--repeat", "1",
                      "--json", str(out)])
    assert [r["setting"] for r in rows] == ["1 process, all experts",
                                            "2 ranks, alltoall",
                                            "2 ranks, alltoall-exact",
                                            "2 ranks, fairscale MOELayer"]
    assert all(r["ms"] > 0 for r in rows)
    # each rank sends its 32 rows there and back, in forward and backward
    one, padded, exact, fairscale = rows
    assert one["rows_sent_per_rank"] == 0
    assert exact["rows_sent_per_rank"] == exact["rows_needed_per_rank"] == 4 * 32
    assert padded["rows_sent_per_rank"] >= padded["rows_needed_per_rank"] == 4 * 32
    assert json.loads(out.read_text()) == rows


def test_rows_on_the_wire_padding_goes_nowhere_and_the_exact_exchange_sends_what_is_needed():
    rows = bench.run(["--ranks", "2", "--wire", "--repeat", "1"])
    assert {(r["ranks"], r["padding"]) for r in rows} >= {(8, 0.25), (2, 0.0)}
    for r in rows:
        assert r["exact"] == r["rows_needed"] <= r["padded_now"] <= r["padded_before"]
        if r["padding"] > 0:  # padding positions no longer inflate expert 0's block
            assert r["padded_now"] < r["padded_before"]


@pytest.mark.integration  # starts 4 ranks inside bench.run
def test_four_rank_layer_benchmark_counts_rows_needed_and_rows_padded():
    rows = bench.run(["--ranks", "4", "--experts", "8", "--tokens", "32", "--repeat", "1"])
    assert [r["setting"] for r in rows] == ["1 process, all experts", "4 ranks, alltoall",
                                            "4 ranks, alltoall-exact",
                                            "4 ranks, fairscale MOELayer"]
    assert rows[1]["tokens_per_step"] == 4 * 32
    # a rank's 32 tokens, there and back, in forward and backward; padded to 4 equal blocks
    assert rows[1]["rows_needed_per_rank"] == 4 * 32
    assert rows[1]["rows_sent_per_rank"] >= rows[1]["rows_needed_per_rank"]
    assert rows[1]["rows_sent_per_rank"] % (4 * 4) == 0


def test_more_ranks_than_the_benchmark_starts_are_refused_in_one_line():
    from fairseq_hash.errors import HashConfigError

    with pytest.raises(HashConfigError, match="--ranks 3: supports 2 and 4"):
        bench.run(["--ranks", "3"])


@pytest.mark.integration  # starts 2 ranks inside bench.run
def test_two_rank_count_gathers_are_timed_for_all_layers_and_per_layer():
    rows = bench.run(["--ranks", "2", "--counts", "--experts", "8", "--layers", "3"])
    assert {r["setting"] for r in rows} == {"one gather for all layers", "one gather a layer"}
    assert all(r["us"] > 0 for r in rows)
