"""Let torch's weights-only unpickler read fairseq's own checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, which
refuses any class not on an allow-list. fairseq-fixed 0.12.3.1 calls it with
the default in two places that our users reach:

- ``checkpoint_utils.load_checkpoint_to_cpu``: checkpoints of argparse-style
  models (``transformer``, ``roberta``, and so ``hash_transformer`` and
  ``hash_roberta``) hold their flags as an ``argparse.Namespace``;
- ``distributed.utils.broadcast_object``: when training resumes on several
  ranks, rank 0 loads the checkpoint, turns its config into an omegaconf
  ``DictConfig`` and sends it to the others, which unpickle it.

Both fail with "Unsupported global". Measured with torch 2.13 by pickling a
fairseq training config and its namespace and loading them back::

    python -c "import fairseq_hash.safe_globals as s; s.check_roundtrip()"

This module allows exactly the types those objects are built of, nothing
more; it is imported with the plugin, before fairseq loads anything.
"""
import argparse
import collections
import io
import typing

import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

FAIRSEQ_CHECKPOINT_TYPES = [
    argparse.Namespace,  # args of argparse-style models
    # a DictConfig as omegaconf pickles it
    DictConfig, ListConfig, ContainerMetadata, Metadata,
    AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode,
    typing.Any, dict, list, int, collections.defaultdict,
    # broadcast_object sends tensors apart from the rest, leaving these in their place
    _TensorPlaceholder,
]


def allow_fairseq_checkpoint_types():
    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_TYPES)


def check_roundtrip():
    """Pickle a fairseq training config and namespace; load them weights-only."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["data", "--arch", "transformer_lm",
                                                "--task", "language_modeling"])
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True,
                                 enum_to_str=True)
    buffer = io.BytesIO()
    torch.save({"cfg": OmegaConf.create(cfg), "args": args}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu")
    assert state["args"].arch == "transformer_lm"
    print("fairseq's config and namespace load with weights_only=True")


allow_fairseq_checkpoint_types()
