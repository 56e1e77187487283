"""The hash layers' command-line flags, as fairseq reads them for ``--help`` and checkpoints.

    @dataclass
    class HashTransformerLanguageModelConfig(TransformerLanguageModelConfig, HashLayerConfig): ...

``HashRoutingConfig`` holds the flags every hash model shares; the three
subclasses add where the hash layers are (``--hash-layer``,
``--encoder-hash-layer``, ``--decoder-hash-layer``). The defaults are
``spec.HashLayerSpec``'s, the typed value the models build from these flags.
"""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass

from ..hashing import HASH_REGISTRY
from ..spec import HashLayerSpec

DEFAULT = HashLayerSpec()


@dataclass
class HashRoutingConfig(FairseqDataclass):
    """How hash layers route, on whichever side of the model they are."""

    hash_experts: int = field(
        default=DEFAULT.total_experts, metadata={"help": "number of expert FFNs in each hash layer (K >= 2)"}
    )
    hash_type: str = field(
        default=DEFAULT.hash_type,
        metadata={
            "help": "hash function from token to expert: "
            + ", ".join(sorted(HASH_REGISTRY))
            + " (balanced: greedy over dict.txt counts; random: seeded table; bigram, "
            "previous, future, position: by token pair, previous token, next token "
            "(an oracle: no generation), position; clustered, dispersed: need --hash-file)"
        },
    )
    hash_seed: int = field(
        default=DEFAULT.hash_seed,
        metadata={"help": "seed of random hash tables (layer i uses seed + i; in "
                  "hash_transformer, decoder layer i uses seed + encoder layers + i)"},
    )
    router: str = field(
        default=DEFAULT.router,
        metadata={
            "help": "how the routed layers choose experts: hash (the token's hash, no "
            "parameters), switch (learned top-1 gate), top2 (GShard top-2 gate, "
            "fairscale's Top2Gate) or base (BASE layers' balanced assignment); switch "
            "and top2 need a moe_ criterion for their auxiliary loss (moe_cross_entropy, "
            "moe_label_smoothed_cross_entropy, moe_sentence_prediction, moe_masked_lm)"
        },
    )
    capacity_factor: float = field(
        default=DEFAULT.capacity_factor,
        metadata={
            "help": "--router switch: in training each expert takes at most "
            "capacity-factor * tokens / experts tokens of a batch; the rest skip the "
            "layer's FFN and are counted as dropped (top2 uses fairscale's fixed 2 * "
            "tokens / experts; evaluation drops nothing)"
        },
    )
    hash_count: int = field(
        default=DEFAULT.num_hashes,
        metadata={
            "help": "MultiHash: number of hashes N; each picks the expert of one of N "
            "equal segments of the FFN's hidden units (--decoder-ffn-embed-dim must "
            "divide by N; 1: the plain hash layer)"
        },
    )
    hash_file: Optional[str] = field(
        default=DEFAULT.hash_file,
        metadata={
            "help": "JSON table file from fairseq-hash-table (or your own, see "
            "docs/hash_tables.md) used by every hash layer instead of building one; "
            "its type, expert count and dictionary must match --hash-type, "
            "--hash-experts and the data. A .pt or .safetensors file holding an "
            "integer tensor tid2eid [vocabulary, --hash-topk] is imported as the table"
        },
    )
    hash_topk: int = field(
        default=DEFAULT.topk,
        metadata={
            "help": "experts per token k: every hash table gives each token k distinct "
            "experts, whose outputs are averaged or weighed by --hash-score (default 1: "
            "the paper's hash layer; not with --hash-count > 1)"
        },
    )
    hash_score: str = field(
        default=DEFAULT.score,
        metadata={
            "help": "weights of a token's k experts: none (the paper: plain output for "
            "k=1, mean for k>1), or a learned linear gate over the hidden state, "
            "evaluated at the k hashed experts only: softmax, sigmoid or sqrt-softplus "
            "(normalised over the k when k>1)"
        },
    )
    hash_score_scale: float = field(
        default=DEFAULT.score_scale,
        metadata={"help": "--hash-score: every expert weight is multiplied by this (default 1)"},
    )
    hash_shared_experts: int = field(
        default=DEFAULT.shared_experts,
        metadata={
            "help": "number of shared experts: dense FFNs every token of a hash layer "
            "passes through, added to the routed experts' output (default 0)"
        },
    )
    hash_shared_ffn_dim: int = field(
        default=DEFAULT.shared_ffn_dim,
        metadata={
            "help": "hidden width of each shared expert (default 0: "
            "--decoder-ffn-embed-dim)"
        },
    )
    hash_expert_ffn_dim: int = field(
        default=DEFAULT.expert_ffn_dim,
        metadata={
            "help": "hidden width of each routed expert (default 0: "
            "--decoder-ffn-embed-dim); e.g. half of it, with a shared expert of the "
            "other half, keeps a token's compute that of the dense FFN"
        },
    )
    moe_expert_parallel_size: int = field(
        default=DEFAULT.parallel_size,
        metadata={
            "help": "expert parallelism on several ranks: spread each hash layer's "
            "experts over groups of P ranks, K/P experts a rank, the W/P groups being "
            "data-parallel replicas (default 0: P = W when W divides K, else P = K when "
            "K divides W, cut to a divisor of the ranks of one node: torchrun's "
            "LOCAL_WORLD_SIZE, else the node's GPUs; 1: every expert on every rank)"
        },
    )
    hash_offload_experts: str = field(
        default=DEFAULT.offload_experts,
        metadata={
            "help": "inference only: keep the routed experts out of memory, memory-mapped "
            "from the checkpoint, and load the ones a batch uses into a bounded cache "
            "(--hash-expert-cache): prefetch (hash layers' experts, known from the token "
            "ids, are loaded ahead on a background thread while earlier layers compute; "
            "learned routers load on demand), demand (each layer loads what it needs when "
            "it runs) or none (default). Serving tools take it as --model-overrides "
            "\"{'hash_offload_experts': 'prefetch'}\" (docs/offload.md)"
        },
    )
    hash_expert_cache: str = field(
        default=DEFAULT.expert_cache,
        metadata={
            "help": "--hash-offload-experts: the most experts kept loaded at once in an "
            "encoder or decoder, as a count (e.g. 16) or a size (e.g. 256MB); 0 (default): "
            "one layer's experts. A layer needing more loads them in turns"
        },
    )
    no_save_on_signal: bool = field(
        default=False,
        metadata={
            "help": "fairseq-train: leave SIGTERM and SIGUSR1 to Python's defaults (by default "
            "every rank finishes its update, checkpoint_last is saved and training exits with "
            "128 + the signal, for the scheduler to requeue)"
        },
    )
    moe_dispatch: str = field(
        default=DEFAULT.dispatch,
        metadata={
            "help": "how tokens reach experts on other ranks: alltoall (sorted by expert, "
            "padded to the step's largest count, fairscale's all-to-all), alltoall-exact "
            "(torch's all_to_all_single with exact split sizes: no padding rows) or "
            "fairscale (fairscale's MOELayer with dense dispatch masks, for comparison)"
        },
    )


def _layers_field(side: str, routed_by: str = ""):
    return field(default="-1", metadata={"help": (
        f"comma-separated 0-based indices of the {side} layers whose FFN becomes a hash "
        f"layer; negative indices count from the end (default -1: the last layer; an "
        f"empty value: none){routed_by}")})


@dataclass
class HashLayerConfig(HashRoutingConfig):
    """``hash_transformer_lm``: hash layers in the decoder."""

    hash_layer: str = _layers_field("decoder")


@dataclass
class EncoderHashConfig(HashRoutingConfig):
    """``hash_roberta``: hash layers in the encoder, routed by the source tokens."""

    encoder_hash_layer: str = _layers_field(
        "encoder", "; routed by the source tokens, with the source dictionary's table")


@dataclass
class EncoderDecoderHashConfig(EncoderHashConfig):
    """``hash_transformer``: hash layers in the encoder and in the decoder."""

    decoder_hash_layer: str = _layers_field(
        "decoder", "; routed by the previous output tokens, with the target dictionary's table")


def fill_hash_defaults(args, config_cls):
    """Give an argparse model's ``args`` our flags' defaults where they are missing.

    fairseq's argparse models (``transformer``, ``roberta``) set their defaults
    in architecture functions, and a dense checkpoint's args lack our flags.
    """
    for name, value in vars(config_cls()).items():
        if not name.startswith("_") and not hasattr(args, name):
            setattr(args, name, value)
