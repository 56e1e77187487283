"""``fairseq-hash-upcycle``: a dense fairseq checkpoint -> a hash checkpoint of the same model.

    fairseq-hash-upcycle dense/checkpoint_best.pt --hash-layer -1 --hash-experts 16 \\
        --output hash/upcycled.pt

Every expert of a hash layer starts as a copy of the dense layer's FFN, so
before any training the hash model computes exactly what the dense one did
(to float rounding). All other weights are carried over. The families:
``transformer_lm*`` -> ``hash_transformer_lm*`` (``--hash-layer``),
``transformer*`` -> ``hash_transformer*`` (``--encoder-hash-layer``,
``--decoder-hash-layer``), ``roberta*`` -> ``hash_roberta*``
(``--encoder-hash-layer``). The tables are built from the checkpoint's
dictionaries (``--data`` if its data folder moved). The output keeps the dense
run's flags and training progress but no optimizer state (the parameters
changed): continue with ``fairseq-train --restore-file HASH.pt
--reset-optimizer`` or fine-tune with ``--finetune-from-model HASH.pt``.
"""
import argparse
import logging
import os
import sys

from .command import command

# the hash flags of each family, and the model each family becomes
FAMILIES = {
    "transformer_lm": ("hash_transformer_lm", ["hash_layer"]),
    "transformer": ("hash_transformer", ["encoder_hash_layer", "decoder_hash_layer"]),
    "roberta": ("hash_roberta", ["encoder_hash_layer"]),
}
LAYER_FLAGS = sorted({flag for _, flags in FAMILIES.values() for flag in flags})

logger = logging.getLogger("fairseq_hash.upcycle")


def _set(cfg, name, value):
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            cfg[name] = value
    else:
        setattr(cfg, name, value)


def hash_modules(model):
    """``(state-dict prefix, HashLayers module)`` of every side of ``model`` that has hash layers."""
    from fairseq_hash.models.hash_layers import HashLayers

    return [(name, m) for name, m in model.named_modules() if isinstance(m, HashLayers)]


def copy_dense_ffns(model, dense_state, path):
    """Load ``dense_state`` into ``model``, each hash layer's experts from its dense FFN."""
    from fairseq_hash.errors import HashConfigError

    state, used = model.state_dict(), set()
    for name, module in hash_modules(model):
        for idx, moe in module.moe_layers.items():
            experts = moe.experts
            prefix = f"{name}.layers.{idx}"
            want = {"fc1.weight": experts.fc1_weight[0], "fc1.bias": experts.fc1_bias[0],
                    "fc2.weight": experts.fc2_weight[0], "fc2.bias": experts.fc2_bias[0]}
            dense = {k: dense_state.get(f"{prefix}.{k}") for k in want}
            for key, like in want.items():
                if dense[key] is None or dense[key].shape != like.shape:
                    found = "none" if dense[key] is None else list(dense[key].shape)
                    raise HashConfigError(
                        f"{path}: {module.side} layer {idx} has no dense FFN of the model's "
                        f"shape ({prefix}.{key}: want {list(like.shape)}, found {found}); "
                        f"choose another {module.hash_flag} or check the checkpoint")
            experts.load_dense(argparse.Namespace(weight=dense["fc1.weight"], bias=dense["fc1.bias"]),
                               argparse.Namespace(weight=dense["fc2.weight"], bias=dense["fc2.bias"]))
            used.update(f"{prefix}.{key}" for key in want)
            for key, value in experts.state_dict().items():
                state[f"{prefix}.fc1.experts.{key}"] = value
    for key, value in dense_state.items():
        if key in used:
            continue
        if key in state and state[key].shape == value.shape:
            state[key] = value
        else:
            logger.warning(f"{path}: {key} has no place in the hash model; left out")
    model.load_state_dict(state, strict=True)
    return model.state_dict()


def read_checkpoint(path):
    """fairseq's checkpoint dict of ``path``, or a one-line error for a file that is not one
    (truncated by a copy or a full disk, or another kind of file)."""
    from fairseq import checkpoint_utils

    from fairseq_hash.errors import HashConfigError, unreadable_checkpoint

    try:
        # a file torch cannot read is refused there (distributed_checkpoints.read_errors)
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except OSError as e:
        raise unreadable_checkpoint(path, e) from None
    except (KeyError, AttributeError, TypeError) as e:
        # fairseq's loader upgrades old layouts and looks up their keys without a check
        raise HashConfigError(f"{path}: not a fairseq checkpoint ({type(e).__name__}: {e} in "
                              "fairseq's loader); give a checkpoint written by fairseq-train") from None
    if not isinstance(state, dict) or state.get("cfg") is None or "model" not in state:
        raise HashConfigError(f"{path}: not a fairseq checkpoint (no cfg and model in it); give "
                              "a checkpoint written by fairseq-train")
    return state


def upcycle(dense_path, output, hash_args: dict, data=None):
    """Write the hash checkpoint ``output`` from ``dense_path``; returns the hash model."""
    import torch
    from fairseq import tasks
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY
    from omegaconf import OmegaConf

    import fairseq_hash  # noqa: F401  (registers the models, allows fairseq's checkpoint types)
    from fairseq_hash.errors import HashConfigError

    if os.path.exists(output):
        raise HashConfigError(f"--output {output} exists; give a new path (nothing is overwritten)")
    if not os.path.isfile(dense_path):
        raise HashConfigError(f"{dense_path}: no such checkpoint")
    state = read_checkpoint(dense_path)
    cfg = state["cfg"]
    # argparse models keep --arch; dataclass ones (transformer_lm) only their model's name
    arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", None)
    family = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if family not in FAMILIES:
        raise HashConfigError(
            f"{dense_path}: --arch {arch} is not a dense model we upcycle; valid: the "
            f"architectures of {', '.join(FAMILIES)}")
    hash_model, layer_flags = FAMILIES[family]
    given = [f for f in LAYER_FLAGS if hash_args.get(f) is not None]
    wrong = [f for f in given if f not in layer_flags]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise HashConfigError(
            f"{flag} does not apply to {arch} ({family}); use "
            + " / ".join("--" + f.replace("_", "-") for f in layer_flags))
    if getattr(cfg.model, "arch", None):
        _set(cfg.model, "arch", "hash_" + arch)
    if getattr(cfg.model, "_name", None):
        # dataclass models are found by model name, argparse ones by architecture
        _set(cfg.model, "_name", hash_model if family == "transformer_lm" else "hash_" + arch)
    for name, value in hash_args.items():
        if value is not None:
            _set(cfg.model, name, value)
    if data is not None:
        _set(cfg.task, "data", data)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    if not hash_modules(model) or not any(m.moe_layers for _, m in hash_modules(model)):
        flags = " or ".join("--" + f.replace("_", "-") for f in layer_flags)
        raise HashConfigError(f"no hash layer chosen: give {flags}")
    state["model"] = copy_dense_ffns(model, state["model"], dense_path)
    state["last_optimizer_state"] = None
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tmp = output + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, output)  # never a half-written checkpoint
    return model


@command("fairseq-hash-upcycle")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-upcycle",
                                     description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("dense", metavar="DENSE.pt", help="a dense fairseq checkpoint")
    parser.add_argument("--output", required=True, metavar="HASH.pt",
                        help="where to write the hash checkpoint (must not exist)")
    parser.add_argument("--hash-layer", help="transformer_lm: decoder layers to route, e.g. -1 or 0,-1")
    parser.add_argument("--encoder-hash-layer",
                        help="transformer, roberta: encoder layers to route ('' for none)")
    parser.add_argument("--decoder-hash-layer",
                        help="transformer: decoder layers to route ('' for none)")
    parser.add_argument("--hash-experts", type=int, default=16,
                        help="experts per hash layer, each a copy of the dense FFN (default 16)")
    parser.add_argument("--hash-type", default="balanced",
                        help="hash function, as fairseq-train's --hash-type (default balanced)")
    parser.add_argument("--hash-seed", type=int, default=1, help="seed of random tables (default 1)")
    parser.add_argument("--hash-count", type=int, default=1, help="MultiHash hashes (default 1)")
    parser.add_argument("--hash-file", help="a table file from fairseq-hash-table")
    parser.add_argument("--data", help="the data folder with the checkpoint's dict.txt, if it "
                        "moved since training (default: the checkpoint's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    hash_args = {k: getattr(args, k) for k in LAYER_FLAGS + ["hash_experts", "hash_type",
                                                             "hash_seed", "hash_count", "hash_file"]}
    upcycle(args.dense, args.output, hash_args, args.data)
    print(args.output)


if __name__ == "__main__":
    sys.exit(main())
