"""hash_transformer: encoder and decoder hash layers through fairseq's translation task."""
import json
import os
import re
import sys

import pytest
import torch
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from conftest import TINY_TRAIN, json_logs, run, tool, user_dir
from models_util import TINY_SEQ2SEQ, seq2seq_data, seq2seq_model, sentences
from fairseq_hash.errors import HashConfigError
from fairseq_hash.hashing import dictionary_fingerprint

# the hash types that need no table file; future cannot generate (tested apart)
HASH_TYPES = ["balanced", "random", "bigram", "previous", "position"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return seq2seq_data(str(tmp_path_factory.mktemp("seq2seq")))


def batch(rows, pad, left_pad):
    tokens = data_utils.collate_tokens(rows, pad, left_pad=left_pad)
    return tokens, torch.tensor([len(r) for r in rows])


def full_forward_scores(model, src, src_len, hypo_tokens, eos):
    """Log-probabilities of a hypothesis' tokens from one teacher-forced forward pass."""
    prev = torch.cat([hypo_tokens.new_tensor([eos]), hypo_tokens[:-1]]).unsqueeze(0)
    out = model(src, src_len, prev)
    lprobs = model.get_normalized_probs(out, log_probs=True)[0]  # [T, V]
    return lprobs.gather(1, hypo_tokens.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_beam_search_scores_equal_full_forward(pairs, side, hash_type):
    other = "decoder" if side == "encoder" else "encoder"
    model, task = seq2seq_model(pairs, "--hash-type", hash_type, f"--{side}-hash-layer", "0,-1",
                                f"--{other}-hash-layer", "")
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    rows = sentences(src_dict, [7, 4, 9])
    src, src_len = batch(rows, src_dict.pad(), left_pad=True)  # as the translation task pads
    generator = SequenceGenerator([model], tgt_dict, beam_size=5, max_len_b=12)
    with torch.no_grad():
        hypos = generator.forward({"net_input": {"src_tokens": src, "src_lengths": src_len}})
        checked = 0
        for i, beams in enumerate(hypos):
            assert len(beams) == 5
            for hypo in beams:
                want = full_forward_scores(model, rows[i].unsqueeze(0),
                                           src_len[i:i + 1], hypo["tokens"], tgt_dict.eos())
                torch.testing.assert_close(hypo["positional_scores"], want, rtol=1e-4, atol=1e-4)
                checked += 1
    assert checked == 15


@pytest.mark.parametrize("hash_type", HASH_TYPES + ["future"])
def test_padded_batches_route_as_each_sentence_alone(pairs, hash_type):
    model, task = seq2seq_model(pairs, "--hash-type", hash_type)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src_rows = sentences(src_dict, [6, 3, 8], seed=1)
    tgt_rows = sentences(tgt_dict, [5, 9, 2], seed=2)
    alone = []
    with torch.no_grad():
        for s, t in zip(src_rows, tgt_rows):
            model(s.unsqueeze(0), torch.tensor([len(s)]), t.unsqueeze(0))
            alone.append({(side, idx): moe.last_indices.clone()
                          for side, m in (("encoder", model.encoder), ("decoder", model.decoder))
                          for idx, moe in m.moe_layers.items()})
        for left_pad in (True, False):
            src, src_len = batch(src_rows, src_dict.pad(), left_pad)
            tgt, _ = batch(tgt_rows, tgt_dict.pad(), left_pad)
            model(src, src_len, tgt)
            for side, m, tokens in (("encoder", model.encoder, src), ("decoder", model.decoder, tgt)):
                real = tokens.ne(m.dictionary.pad())  # [B, T]
                for idx, moe in m.moe_layers.items():
                    # last_indices is time-major: [T*B, 1]
                    got = moe.last_indices.view(tokens.size(1), tokens.size(0), -1).transpose(0, 1)
                    for b in range(tokens.size(0)):
                        assert torch.equal(got[b][real[b]], alone[b][side, idx]), (side, idx, b)


def test_each_side_builds_its_tables_from_its_own_dictionary(pairs):
    model, task = seq2seq_model(pairs, "--hash-type", "random")
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    assert len(src_dict) != len(tgt_dict) or src_dict.symbols != tgt_dict.symbols
    for module, d in ((model.encoder, src_dict), (model.decoder, tgt_dict)):
        assert module.hash_layer_ids == [0, 1]
        for moe in module.moe_layers.values():
            assert moe.router.table.size(0) == len(d)
            assert int(moe.router.dict_fingerprint) == dictionary_fingerprint(d)
    # seeded apart: the encoder's layer 0 and the decoder's layer 0 differ
    enc, dec = model.encoder.moe_layers[0], model.decoder.moe_layers[0]
    assert not torch.equal(enc.experts.fc1_weight, dec.experts.fc1_weight)


@pytest.mark.parametrize("router", ["switch", "top2", "base"])
def test_learned_routers_train_on_both_sides(pairs, router):
    model, task = seq2seq_model(pairs, "--router", router)
    model.train()
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src, src_len = batch(sentences(src_dict, [6, 3, 8, 5]), src_dict.pad(), True)
    tgt, _ = batch(sentences(tgt_dict, [5, 9, 2, 4]), tgt_dict.pad(), False)
    out, _ = model(src, src_len, tgt)
    out.float().logsumexp(-1).mean().backward()
    for module in (model.encoder, model.decoder):
        for moe in module.moe_layers.values():
            gate = next(p for n, p in moe.router.named_parameters())
            assert gate.grad is not None and torch.isfinite(gate.grad).all()
            if router != "base":
                assert torch.isfinite(moe.aux_loss)


def test_future_hash_generates_in_the_encoder_and_refuses_in_the_decoder(pairs):
    src_rows = None
    for side, refused in (("encoder", False), ("decoder", True)):
        other = "decoder" if side == "encoder" else "encoder"
        model, task = seq2seq_model(pairs, "--hash-type", "future", f"--{other}-hash-layer", "")
        src_rows = src_rows or sentences(task.source_dictionary, [5, 7])
        src, src_len = batch(src_rows, task.source_dictionary.pad(), True)
        generator = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=5)
        sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}}
        if refused:
            with pytest.raises(HashConfigError, match="--hash-type future"):
                generator.forward(sample)
        else:
            assert len(generator.forward(sample)) == 2


def test_train_resume_and_generate_through_fairseq_without_environment(pairs, tmp_path):
    env_flags = [k for k in os.environ if k.startswith("TORCH_FORCE")]
    assert not env_flags  # the checkpoint must load with torch's weights-only default
    save = str(tmp_path / "ckpt")
    train = [tool("fairseq-train"), pairs, "--user-dir", user_dir(), *TINY_SEQ2SEQ, *TINY_TRAIN,
             "--save-dir", save, "--hash-type", "bigram"]
    first = run([*train, "--max-update", "20"])
    losses = [row["loss"] for row in json_logs(first.stderr + first.stdout, "train_inner")]
    assert losses[-1] < losses[0]
    tables = {k: v for k, v in torch.load(os.path.join(save, "checkpoint_last.pt"))["model"].items()
              if k.endswith("router.table")}
    assert len(tables) == 4
    resumed = run([*train, "--max-update", "30"])
    log = resumed.stderr + resumed.stdout
    assert "loaded checkpoint" in log.lower()
    assert int(json_logs(log, "train_inner")[0]["num_updates"]) > 20
    state = torch.load(os.path.join(save, "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 30
    assert all(torch.equal(state["model"][k], t) for k, t in tables.items())
    gen = run([tool("fairseq-generate"), pairs, "--user-dir", user_dir(), "--path",
               os.path.join(save, "checkpoint_last.pt"), "--beam", "5", "--cpu",
               "--max-tokens", "1024", "--num-workers", "0"])
    hyps = [l for l in gen.stdout.splitlines() if l.startswith("H-")]
    sources = [l for l in gen.stdout.splitlines() if l.startswith("S-")]
    # fairseq translates 32 of the 39 pairs here, a dense transformer too
    assert len(hyps) == len(sources) >= 30
    assert re.search(r"BLEU4 = [0-9.]+", gen.stdout + gen.stderr)


def test_generate_speed_script_prints_both_models(pairs, tmp_path):
    out = str(tmp_path / "rows.json")
    proc = run([sys.executable, "-m", "fairseq_hash.cli.bench.generate", pairs, "--updates", "2", "--repeats", "1", "--layers", "1",
                "--embed-dim", "32", "--ffn-dim", "64", "--experts", "4", "--length", "5",
                "--json", out])
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["model", "sentences", "sent/s"]
    assert [l.split()[0] for l in lines[2:4]] == ["dense", "hash"]
    rows = json.load(open(out))["rows"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["sentences_per_s"] > 0
    assert rows[0]["sentences"] == rows[1]["sentences"] > 0


def test_torchscript_is_refused_in_one_line_alone_and_in_an_ensemble(pairs):
    from fairseq_hash.errors import HashConfigError
    from models_util import build_in_process

    model, task = seq2seq_model(pairs)
    with pytest.raises(HashConfigError, match=r"TorchScript \(torch.jit.script\) cannot compile "
                                              r"this model's encoder hash layers yet"):
        torch.jit.script(model)
    ours = {"--arch", "--hash-experts", "--encoder-hash-layer", "--decoder-hash-layer"}
    flags = [f for i, f in enumerate(TINY_SEQ2SEQ) if f not in ours and TINY_SEQ2SEQ[i - 1] not in ours]
    dense, _ = build_in_process([pairs, *flags, "--arch", "transformer_tiny", "--cpu"])
    generator = SequenceGenerator([dense, model], task.target_dictionary, beam_size=2)
    with pytest.raises(HashConfigError, match="deploy the eager model"):
        torch.jit.script(generator)
