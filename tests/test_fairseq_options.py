"""fairseq's own options on a hash model: each works, or is refused in one line naming it.

One row an option (``OPTIONS``); ``docs/fairseq-options.md`` has one table row for
each, with the same verdict (``test_the_page_lists_every_row_with_its_verdict``).
A row that works trains a 3-layer hash LM (``--hash-layer 0,-1``) for 2 updates,
saves, resumes for 1 more and evaluates the saved checkpoint (the resumed run's,
3 updates) with fairseq-eval-lm: finite losses. On 2 ranks (under ``fairseq_hash.cli.torchrun_train``), working
means the losses of one rank with ``--update-freq 2``, update for update.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir
from models_util import TINY_SEQ2SEQ, seq2seq_data
from test_expert_parallel import losses, train_on_one_rank
from test_torchrun_train import torchrun_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "..", "docs", "fairseq-options.md")
THREE = ["--decoder-layers", "3", "--hash-layer", "0,-1"]  # hash layers 0 and 2


@dataclass(frozen=True)
class Option:
    name: str  # the page's first column
    train: Tuple[str, ...] = ()  # flags of every fairseq-train run
    resume: Tuple[str, ...] = ()  # flags of the resumed run only
    overrides: Optional[str] = None  # fairseq-eval-lm's --model-overrides
    verdict: str = "works"  # works / refused / fairseq (fairseq's own failure, dense too)
    refusal: str = ""  # the one line a refusal prints (a part of it)
    ranks: int = 1


OPTIONS = [
    Option("--store-ema --ema-fp32", ("--store-ema", "--ema-fp32", "--ema-decay", "0.9")),
    Option("--decoder-layerdrop, decoder_layers_to_keep", ("--decoder-layerdrop", "0.2"),
           overrides="{'decoder_layers_to_keep': '0,2'}"),
    Option("--checkpoint-activations", ("--checkpoint-activations",)),
    Option("--offload-activations", ("--offload-activations",)),
    Option("--adaptive-softmax-cutoff", ("--adaptive-softmax-cutoff", "20,60", "--criterion",
                                         "adaptive_loss", "--ddp-backend", "legacy_ddp")),
    Option("--share-decoder-input-output-embed", ("--share-decoder-input-output-embed",)),
    Option("--quant-noise-pq", ("--quant-noise-pq", "0.1"), verdict="fairseq",
           refusal="mat1 and mat2 shapes cannot be multiplied"),
    Option("--update-freq", ("--update-freq", "2")),
    Option("--clip-norm", ("--clip-norm", "0.1")),
    Option("--reset-optimizer --reset-dataloader", resume=("--reset-optimizer",
                                                          "--reset-dataloader")),
    Option("--finetune-from-model", resume=("--finetune-from-model",)),
    Option("--model-overrides", overrides="{'hash_expert_cache': '2'}"),
    Option("--ddp-backend legacy_ddp", ("--ddp-backend", "legacy_ddp"), ranks=2),
    Option("--ddp-backend no_c10d", ("--ddp-backend", "no_c10d"), ranks=2),
    Option("--ddp-backend pytorch_ddp", ("--ddp-backend", "pytorch_ddp"), ranks=2,
           verdict="refused", refusal="--ddp-backend pytorch_ddp needs GPUs"),
    Option("--ddp-backend fully_sharded", ("--ddp-backend", "fully_sharded"), ranks=2,
           verdict="refused", refusal="--ddp-backend fully_sharded cannot keep hash-layer"),
    Option("--ddp-backend slowmo", ("--ddp-backend", "slowmo"), ranks=2, verdict="refused",
           refusal="--ddp-backend slowmo cannot keep hash-layer experts"),
    Option("--zero-sharding os", ("--zero-sharding", "os"), ranks=2, verdict="refused",
           refusal="--zero-sharding os: fairscale's OSS takes every rank's parameters"),
    Option("--use-bmuf", ("--use-bmuf",), ranks=2, verdict="refused",
           refusal="--use-bmuf averages every parameter over all ranks"),
    Option("--bf16", ("--bf16",)),
]


def train(data_bin, save, *flags, check=True):
    return run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, *THREE, "--save-dir", save, *flags], check=check)


def eval_loss(data_bin, path, overrides=None):
    extra = ["--model-overrides", overrides] if overrides else []
    proc = run([tool("fairseq-eval-lm"), data_bin, "--path", path, "--user-dir", user_dir(),
                "--cpu", "--gen-subset", "valid", "--max-tokens", "512", "--tokens-per-sample",
                "32", *extra])
    out = proc.stdout + proc.stderr
    assert f"loading model(s) from {path}" in out
    line = next(l for l in out.splitlines() if "Loss (base 2)" in l)
    return float(line.split("Loss (base 2):")[1].split(",")[0])


def one_line(proc, ranks=1):
    lines = [l for l in proc.stderr.splitlines() if "fairseq-hash: error:" in l]
    # under torchrun, its own traceback of the failed workers (ChildFailedError) follows
    launcher = 1 if ranks > 1 else 0
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == launcher, proc.stderr[-3000:]
    return lines[0]


def dense(flags):
    """``flags`` for fairseq's transformer_lm: no hash flags and no --arch of ours."""
    ours = {"--hash-experts", "--hash-layer", "--arch"}
    return [f for i, f in enumerate(flags) if f not in ours and flags[i - 1] not in ours]


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_a_fairseq_option_works_or_is_refused_in_one_line(data_bin, tmp_path, option):
    save = str(tmp_path / "ckpt")
    if option.ranks > 1:
        proc = torchrun_cpu(data_bin, save, *THREE, *option.train)
        if option.verdict == "refused":
            assert option.refusal in one_line(proc, option.ranks)
            assert not os.path.exists(save) or not os.listdir(save)
            return
        assert proc.returncode == 0, proc.stderr[-3000:]
        one = train_on_one_rank(data_bin, str(tmp_path / "one"), *THREE, "--max-update", "4")
        assert len(losses(one)) == 4 and losses(proc) == losses(one)
        return
    first = train(data_bin, save, *option.train, "--max-update", "2",
                  check=option.verdict == "works")
    if option.verdict == "fairseq":  # fairseq's own failure: the dense model fails alike
        assert first.returncode != 0 and option.refusal in first.stderr
        alike = run([tool("fairseq-train"), data_bin, *dense(TINY_MODEL),
                     *TINY_TRAIN, "--arch", "transformer_lm", "--decoder-layers", "3", "--save-dir",
                     str(tmp_path / "dense"), *option.train, "--max-update", "2"], check=False)
        assert alike.returncode != 0 and option.refusal in alike.stderr
        return
    resume = list(option.resume)
    if "--finetune-from-model" in resume:  # a new run that starts from the saved weights
        resume.append(os.path.join(save, "checkpoint_last.pt"))
        save = str(tmp_path / "tuned")
    second = train(data_bin, save, *option.train, *resume, "--max-update", "3")
    rows = json_logs(first.stdout + first.stderr + second.stdout + second.stderr, "train")
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    last = os.path.join(save, "checkpoint_last.pt")
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 3  # the resumed run's save
    assert math.isfinite(eval_loss(data_bin, last, option.overrides))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return seq2seq_data(str(tmp_path_factory.mktemp("options-s2s")))


def test_encoder_layerdrop_with_encoder_layers_to_keep_generates(pairs, tmp_path):
    save = str(tmp_path / "ckpt")
    run([tool("fairseq-train"), pairs, "--user-dir", user_dir(), *TINY_SEQ2SEQ, *TINY_TRAIN,
         "--encoder-layers", "3", "--encoder-layerdrop", "0.2", "--max-update", "2",
         "--save-dir", save])
    gen = run([tool("fairseq-generate"), pairs, "--user-dir", user_dir(), "--path",
               os.path.join(save, "checkpoint_last.pt"), "--beam", "2", "--cpu",
               "--max-tokens", "1024", "--model-overrides",
               # fairseq's prune drops every layer of a side without *_layers_to_keep
               # (checkpoint_utils.prune_state_dict), dense models too: name both sides
               "{'encoder_layers_to_keep': '0,2', 'decoder_layers_to_keep': '0,1'}"])
    assert "encoder hash layers at [0, 1]" in gen.stdout + gen.stderr
    assert len([l for l in gen.stdout.splitlines() if l.startswith("H-")]) >= 30


def page_rows():
    rows = {}
    for line in open(PAGE).read().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].split()[0].strip("*").lower()
    return rows


def test_the_page_lists_every_row_with_its_verdict():
    expected = {o.name: o.verdict for o in OPTIONS}
    expected["--encoder-layerdrop, encoder_layers_to_keep"] = "works"
    assert page_rows() == expected
