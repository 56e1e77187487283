"""``fairseq-hash-report``: how a trained model routes the tokens of a split.

    fairseq-hash-report ckpt/checkpoint_best.pt data-bin --subset valid --output-dir report/

Runs the model over the split (no gradient) and writes ``routing.json`` and one
PNG of the load a hash layer (``load_layer{i}.png``). For every MoE layer:
tokens per expert and their share, max/mean imbalance (1.0 is perfect), the
entropy of the load in bits (and divided by log2 K), the most frequent tokens
of each expert, and the split's perplexity. MultiHash layers are counted per
expert over all their hashes, and per hash under ``per_hash``; top-k layers
(``--hash-topk``) over all k slots of a token, and per slot under ``per_slot``. With
``--compare OTHER.pt`` it also reports, per layer, the fraction of tokens
whose expert differs between the two checkpoints (always 0 for a hash layer
whose table was kept; useful for learned routers). Padding is never counted.
"""
import argparse
import json
import math
import os
import sys
import warnings

import torch

from ..errors import HashConfigError
from .command import command


def load_model(checkpoint, data, hash_file=None):
    from fairseq import checkpoint_utils

    if not os.path.isfile(checkpoint):
        raise HashConfigError(f"checkpoint {checkpoint}: no such file")
    if not os.path.isfile(os.path.join(data, "dict.txt")):
        raise HashConfigError(f"data-bin {data}: no dict.txt there; give a fairseq data-bin folder")
    overrides = {"data": data}
    if hash_file:
        overrides["hash_file"] = hash_file
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides=overrides
    )
    model = models[0].eval()
    if not getattr(model.decoder, "moe_layers", None):
        raise HashConfigError(f"checkpoint {checkpoint} has no hash or MoE layers to report on")
    return model, task


def batches(task, subset, max_tokens):
    try:
        task.load_dataset(subset)
    except FileNotFoundError:
        raise HashConfigError(f"--subset {subset}: no such split in {task.cfg.data}") from None
    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(dataset, max_tokens=max_tokens, max_positions=None,
                                  ignore_invalid_inputs=True, num_workers=0)
    return itr.next_epoch_itr(shuffle=False)


def layer_experts(moe):
    """Expert of every (position, slot) of the last forward: ``[T*B, k]`` in [0, K)."""
    segments = getattr(moe.experts, "num_hashes", 1)  # MultiHash: narrow id = e * N + m
    return moe.last_indices // segments


@torch.no_grad()
def collect(model, task, subset="valid", max_tokens=4096, max_batches=0):
    """Run the split; per-layer routing ``[tokens, k]``, the tokens ``[tokens]``, and nll."""
    pad = task.dictionary.pad()
    tokens, experts = [], {idx: [] for idx in model.decoder.moe_layers}
    nll, count = 0.0, 0
    with warnings.catch_warnings():
        # fairseq's loader asks for pinned memory without a GPU, and its
        # attention passes masks of two dtypes: torch warns about both
        warnings.simplefilter("ignore", UserWarning)
        for i, sample in enumerate(batches(task, subset, max_tokens)):
            if max_batches and i >= max_batches:
                break
            src = sample["net_input"]["src_tokens"]  # [B, T]
            out = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(out, log_probs=True)  # [B, T, V]
            target = sample["target"]
            keep_target = target.ne(pad)
            nll -= float(lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep_target].sum())
            count += int(keep_target.sum())
            flat = src.t().reshape(-1)  # layers see time-major [T, B]
            keep = flat.ne(pad)
            tokens.append(flat[keep])
            for idx, moe in model.decoder.moe_layers.items():
                experts[idx].append(layer_experts(moe)[keep])
    if not tokens:
        raise HashConfigError(f"--subset {subset} is empty")
    return torch.cat(tokens), {idx: torch.cat(e) for idx, e in experts.items()}, nll / max(count, 1)


def load_stats(experts: torch.Tensor, total_experts: int):
    """Counts, shares, max/mean and entropy of expert ids ``[S]`` or ``[S, k]``."""
    counts = torch.bincount(experts.reshape(-1), minlength=total_experts).double()
    share = counts / counts.sum().clamp(min=1)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log2()).sum())
    return {
        "tokens": [int(c) for c in counts],
        "share": [round(float(s), 6) for s in share],
        "max_over_mean": round(float(share.max()) * total_experts, 4),
        "entropy_bits": round(entropy, 4),
        "entropy_normalized": round(entropy / math.log2(total_experts), 4),
    }


def top_tokens(tokens, experts, total_experts, dictionary, top):
    """The ``top`` most frequent tokens of each expert, as [symbol, count] pairs."""
    result = []
    slots = experts.size(1)
    flat_tokens = tokens.repeat_interleave(slots)
    flat_experts = experts.reshape(-1)
    for e in range(total_experts):
        mine = flat_tokens[flat_experts == e]
        if mine.numel() == 0:
            result.append([])
            continue
        ids, counts = mine.unique(return_counts=True)
        best = counts.argsort(descending=True)[:top]
        result.append([[dictionary[int(ids[j])], int(counts[j])] for j in best])
    return result


def layer_report(moe, tokens, experts, dictionary, top):
    num = moe.experts.total_experts
    router = moe.router
    entry = {
        "router": type(router).__name__,
        "hash_type": getattr(getattr(router, "hash_fn", None), "name", None),
        "num_experts": num,
        **load_stats(experts, num),
        "top_tokens": top_tokens(tokens, experts, num, dictionary, top),
    }
    if experts.size(1) > 1:
        # a token's k experts (--hash-topk), or its N hashes (MultiHash)
        key = "per_slot" if getattr(router, "topk", 1) > 1 else "per_hash"
        entry[key] = [load_stats(experts[:, m], num) for m in range(experts.size(1))]
    return entry


def plot_load(entry, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = entry["num_experts"]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.25 * k + 2), 3.2))
    ax.bar(range(k), entry["share"], color="tab:blue")
    ax.axhline(1.0 / k, color="black", linestyle="--", linewidth=1, label="uniform 1/K")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{title}: max/mean {entry['max_over_mean']:.2f}, "
                 f"entropy {entry['entropy_normalized']:.2f} of max", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(checkpoint, data, output_dir, subset="valid", compare=None, top=10, max_tokens=4096,
           max_batches=0, hash_file=None):
    """Write ``routing.json`` and ``load_layer{i}.png`` into ``output_dir``; returns the dict."""
    model, task = load_model(checkpoint, data, hash_file)
    tokens, experts, nll = collect(model, task, subset, max_tokens, max_batches)
    result = {
        "checkpoint": os.path.abspath(checkpoint),
        "data": os.path.abspath(data),
        "subset": subset,
        "tokens": int(tokens.numel()),
        "perplexity": round(math.exp(nll), 4),
        "layers": {},
    }
    os.makedirs(output_dir, exist_ok=True)
    for idx, moe in model.decoder.moe_layers.items():
        entry = layer_report(moe, tokens, experts[idx], task.dictionary, top)
        entry["plot"] = f"load_layer{idx}.png"
        plot_load(entry, f"layer {idx} ({entry['hash_type'] or entry['router']})",
                  os.path.join(output_dir, entry["plot"]))
        result["layers"][str(idx)] = entry
    if compare:
        other, other_task = load_model(compare, data, hash_file)
        other_tokens, other_experts, _ = collect(other, other_task, subset, max_tokens, max_batches)
        result["compare"] = {"checkpoint": os.path.abspath(compare), "changed": {}}
        for idx in experts:
            if idx not in other_experts or not torch.equal(tokens, other_tokens):
                raise HashConfigError(
                    f"--compare {compare}: its MoE layers {sorted(other_experts)} do not "
                    f"match {checkpoint}'s {sorted(experts)}"
                )
            mine, theirs = experts[idx], other_experts[idx]
            if mine.shape != theirs.shape:
                raise HashConfigError(f"--compare {compare}: layer {idx} routes to a different "
                                      f"number of experts per token")
            changed = (mine != theirs).any(dim=1).double().mean()
            result["compare"]["changed"][str(idx)] = round(float(changed), 6)
    with open(os.path.join(output_dir, "routing.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summary_lines(result):
    lines = [f"{result['subset']}: {result['tokens']} tokens, perplexity {result['perplexity']:.2f}"]
    for idx, entry in result["layers"].items():
        lines.append(f"layer {idx} ({entry['hash_type'] or entry['router']}, {entry['num_experts']} "
                     f"experts): max/mean {entry['max_over_mean']:.3f}, entropy "
                     f"{entry['entropy_bits']:.3f} bits ({entry['entropy_normalized']:.3f} of max)")
    for idx, frac in result.get("compare", {}).get("changed", {}).items():
        lines.append(f"layer {idx}: {frac:.2%} of tokens change expert against --compare")
    return lines


@command("fairseq-hash-report")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a hash_transformer_lm checkpoint (.pt)")
    parser.add_argument("data", help="the data-bin folder it was trained on (its dict.txt and splits)")
    parser.add_argument("--subset", default="valid", help="split to run over (default valid)")
    parser.add_argument("--output-dir", required=True, help="folder for routing.json and the PNG plots")
    parser.add_argument("--compare", metavar="CKPT",
                        help="a second checkpoint: report how often a token's expert differs")
    parser.add_argument("--top", type=int, default=10,
                        help="most frequent tokens listed for each expert (default 10)")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="tokens a batch (default 4096)")
    parser.add_argument("--max-batches", type=int, default=0,
                        help="stop after this many batches (default 0: the whole split)")
    parser.add_argument("--hash-file", help="a table file to build the model with instead "
                        "of the one it was trained with (not needed: the checkpoint's own "
                        "table is used either way)")
    args = parser.parse_args(argv)
    result = report(args.checkpoint, args.data, args.output_dir, args.subset, args.compare,
                    args.top, args.max_tokens, args.max_batches, args.hash_file)
    print("\n".join(summary_lines(result)))
    print(os.path.join(args.output_dir, "routing.json"))


if __name__ == "__main__":
    sys.exit(main())
