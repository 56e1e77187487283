"""``--arch hash_transformer_lm``: fairseq's transformer_lm with hash layers.

    fairseq-train data-bin --user-dir $(fairseq-hash-user-dir) \
        --task language_modeling --arch hash_transformer_lm \
        --hash-layer -1 --hash-experts 16 --hash-type balanced

Apart from the FFN sublayers named by ``--hash-layer``, the model is
fairseq's ``transformer_lm`` with the same defaults and the same initial
weights under the same ``--seed``; every architecture preset of transformer_lm
exists here with a ``hash_`` prefix.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models import transformer_lm as fairseq_lm
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

from ..hashing import HASH_REGISTRY
from ..distributed_checkpoints import prepare_expert_parallel
from .hash_decoder import HashTransformerDecoder

logger = logging.getLogger(__name__)


@dataclass
class HashLayerConfig(FairseqDataclass):
    hash_layer: str = field(
        default="-1",
        metadata={
            "help": "comma-separated 0-based indices of the decoder layers whose FFN "
            "becomes a hash layer; negative indices count from the end (default -1: "
            "the last layer)"
        },
    )
    hash_experts: int = field(
        default=16, metadata={"help": "number of expert FFNs in each hash layer (K >= 2)"}
    )
    hash_type: str = field(
        default="balanced",
        metadata={
            "help": "hash function from token to expert: "
            + ", ".join(sorted(HASH_REGISTRY))
            + " (balanced: greedy over dict.txt counts; random: seeded table; bigram, "
            "previous, future, position: by token pair, previous token, next token "
            "(an oracle: no generation), position; clustered, dispersed: need --hash-file)"
        },
    )
    hash_seed: int = field(
        default=1,
        metadata={"help": "seed of random hash tables (layer i uses seed + i)"},
    )
    router: str = field(
        default="hash",
        metadata={
            "help": "how the routed layers choose experts: hash (the token's hash, no "
            "parameters), switch (learned top-1 gate), top2 (GShard top-2 gate, "
            "fairscale's Top2Gate) or base (BASE layers' balanced assignment); learned "
            "routers need --criterion moe_cross_entropy for their auxiliary loss"
        },
    )
    capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "--router switch: in training each expert takes at most "
            "capacity-factor * tokens / experts tokens of a batch; the rest skip the "
            "layer's FFN and are counted as dropped (top2 uses fairscale's fixed 2 * "
            "tokens / experts; evaluation drops nothing)"
        },
    )
    hash_count: int = field(
        default=1,
        metadata={
            "help": "MultiHash: number of hashes N; each picks the expert of one of N "
            "equal segments of the FFN's hidden units (--decoder-ffn-embed-dim must "
            "divide by N; 1: the plain hash layer)"
        },
    )
    hash_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "JSON table file from fairseq-hash-table (or your own, see "
            "docs/hash_tables.md) used by every hash layer instead of building one; "
            "its type, expert count and dictionary must match --hash-type, "
            "--hash-experts and the data. A .pt or .safetensors file holding an "
            "integer tensor tid2eid [vocabulary, --hash-topk] is imported as the table"
        },
    )
    hash_topk: int = field(
        default=1,
        metadata={
            "help": "experts per token k: every hash table gives each token k distinct "
            "experts, whose outputs are averaged or weighed by --hash-score (default 1: "
            "the paper's hash layer; not with --hash-count > 1)"
        },
    )
    hash_score: str = field(
        default="none",
        metadata={
            "help": "weights of a token's k experts: none (the paper: plain output for "
            "k=1, mean for k>1), or a learned linear gate over the hidden state, "
            "evaluated at the k hashed experts only: softmax, sigmoid or sqrt-softplus "
            "(normalised over the k when k>1)"
        },
    )
    hash_score_scale: float = field(
        default=1.0,
        metadata={"help": "--hash-score: every expert weight is multiplied by this (default 1)"},
    )
    hash_shared_experts: int = field(
        default=0,
        metadata={
            "help": "number of shared experts: dense FFNs every token of a hash layer "
            "passes through, added to the routed experts' output (default 0)"
        },
    )
    hash_shared_ffn_dim: int = field(
        default=0,
        metadata={
            "help": "hidden width of each shared expert (default 0: "
            "--decoder-ffn-embed-dim)"
        },
    )
    hash_expert_ffn_dim: int = field(
        default=0,
        metadata={
            "help": "hidden width of each routed expert (default 0: "
            "--decoder-ffn-embed-dim); e.g. half of it, with a shared expert of the "
            "other half, keeps a token's compute that of the dense FFN"
        },
    )
    moe_expert_parallel_size: int = field(
        default=0,
        metadata={
            "help": "expert parallelism on several ranks: spread each hash layer's "
            "experts over groups of P ranks, K/P experts a rank, the W/P groups being "
            "data-parallel replicas (default 0: P = W when W divides K, else P = K when "
            "K divides W; 1: every expert on every rank)"
        },
    )
    moe_dispatch: str = field(
        default="alltoall",
        metadata={
            "help": "how tokens reach experts on other ranks: alltoall (sorted by expert, "
            "padded to the step's largest count, fairscale's all-to-all) or fairscale "
            "(fairscale's MOELayer with dense dispatch masks, for comparison)"
        },
    )


@dataclass
class HashTransformerLanguageModelConfig(TransformerLanguageModelConfig, HashLayerConfig):
    pass


def count_parameters(model):
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
    total = sum(p.numel() for p in model.parameters())
    return total - expert, expert


@register_model("hash_transformer_lm", dataclass=HashTransformerLanguageModelConfig)
class HashTransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.decoder = HashTransformerDecoder.adopt(model.decoder, args, task.target_dictionary)
        prepare_expert_parallel(model)
        shared, expert = count_parameters(model)
        logger.info(
            f"hash_transformer_lm: {shared:,} shared and {expert:,} expert parameters "
            f"({len(model.decoder.hash_layer_ids)} hash layers at "
            f"{model.decoder.hash_layer_ids}, {args.hash_experts} experts each)"
        )
        return model


def _register_presets():
    """hash_<preset> for every transformer_lm preset, with the same defaults."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_CONFIG_REGISTRY

    for arch, model_name in list(ARCH_MODEL_NAME_REGISTRY.items()):
        if model_name == "transformer_lm" and arch != "transformer_lm":
            register_model_architecture("hash_transformer_lm", "hash_" + arch)(
                ARCH_CONFIG_REGISTRY[arch]
            )


_register_presets()
