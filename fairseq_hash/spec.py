"""The hash layers' settings: one typed, frozen value, read once from fairseq's ``args``.

    spec = HashLayerSpec.from_args(args)   # our flags, their defaults where args lack them
    spec.validate(ffn_dim=2048)            # the one-line HashConfigError of the first bad flag
    moe = build_hash_moe(spec, dictionary, layer_idx, embed_dim=512, ffn_dim=2048)

Tests and tools build one directly: ``HashLayerSpec(total_experts=4, hash_type="random")``.
Each field names the flag it comes from; the defaults here are the flags'
defaults (``models/config.py`` holds the flags and their ``--help``, and reads
its defaults from this class).
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from omegaconf import OmegaConf

from .errors import HashConfigError
from .expert_parallel import EXPERT_SAFE_BACKENDS, ranks_per_node
from .hashing import build_hash_function
from .routers import ROUTERS
from .scores import SCORES


def _flag(name: str, default):
    return field(default=default, metadata={"flag": name})


@dataclass(frozen=True)
class HashLayerSpec:
    """How every hash layer of a model is built: experts, routing, widths, parallelism."""

    total_experts: int = _flag("--hash-experts", 16)  # K, on all ranks together
    hash_type: str = _flag("--hash-type", "balanced")
    hash_seed: int = _flag("--hash-seed", 1)
    router: str = _flag("--router", "hash")
    capacity_factor: float = _flag("--capacity-factor", 1.25)
    num_hashes: int = _flag("--hash-count", 1)  # N of MultiHash
    hash_file: Optional[str] = _flag("--hash-file", None)
    topk: int = _flag("--hash-topk", 1)  # experts per token
    score: str = _flag("--hash-score", "none")
    score_scale: float = _flag("--hash-score-scale", 1.0)
    shared_experts: int = _flag("--hash-shared-experts", 0)
    shared_ffn_dim: int = _flag("--hash-shared-ffn-dim", 0)  # 0: the FFN's width
    expert_ffn_dim: int = _flag("--hash-expert-ffn-dim", 0)  # 0: the FFN's width
    parallel_size: int = _flag("--moe-expert-parallel-size", 0)  # P; 0: chosen from the world
    dispatch: str = _flag("--moe-dispatch", "alltoall")
    offload_experts: str = _flag("--hash-offload-experts", "none")  # none, prefetch, demand
    expert_cache: str = _flag("--hash-expert-cache", "0")  # experts, or a size such as 256MB
    # fairseq's flags that matter on several ranks, where the model sees them
    ddp_backend: Optional[str] = None  # --ddp-backend
    layerdrop: Tuple[Tuple[str, float], ...] = ()  # (--encoder-layerdrop, rate) where not 0
    store_ema: bool = False  # --store-ema
    eval_bleu: bool = False  # --eval-bleu
    zero_sharding: str = "none"  # --zero-sharding
    use_bmuf: bool = False  # --use-bmuf

    @classmethod
    def from_args(cls, args) -> "HashLayerSpec":
        """From fairseq's ``args`` (argparse Namespace or a dataclass model's config)."""
        values = {f.name: getattr(args, f.metadata["flag"][2:].replace("-", "_"), f.default)
                  for f in dataclasses.fields(cls) if "flag" in f.metadata}
        layerdrop = tuple((f"--{side}-layerdrop", getattr(args, f"{side}_layerdrop"))
                          for side in ("encoder", "decoder")
                          if getattr(args, f"{side}_layerdrop", 0))
        return cls(**values, ddp_backend=ddp_backend_of(args), layerdrop=layerdrop,
                   store_ema=bool(run_setting(args, "ema", "store_ema")),
                   eval_bleu=bool(run_setting(args, "task", "eval_bleu")),
                   zero_sharding=str(run_setting(args, "distributed_training", "zero_sharding")
                                     or "none"),
                   use_bmuf=bool(run_setting(args, "optimization", "use_bmuf")))

    @property
    def learned(self) -> bool:
        """A learned router (switch, top2, base) rather than a hash."""
        return self.router != "hash"

    def expert_width(self, ffn_dim: int) -> int:
        return self.expert_ffn_dim or ffn_dim

    def shared_width(self, ffn_dim: int) -> int:
        return self.shared_ffn_dim or ffn_dim

    def validate(self, ffn_dim: Optional[int] = None, ffn_flag: str = "--decoder-ffn-embed-dim",
                 world_size: int = 1):
        """Raise the one-line error of the first flag that cannot be built.

        ``ffn_dim`` (the width of the FFNs the hash layers replace, set by
        ``ffn_flag``) and ``world_size`` (ranks of the data-parallel world)
        check what depends on the model and the launch.
        """
        K, k, N = self.total_experts, self.topk, self.num_hashes
        if K < 2:
            raise HashConfigError(f"--hash-experts {K}: must be at least 2")
        build_hash_function(self.hash_type)  # raises for an unknown --hash-type
        if self.router not in ROUTERS:
            raise HashConfigError(f"--router {self.router!r} is unknown; valid: {', '.join(ROUTERS)}")
        if self.router == "switch" and not self.capacity_factor > 0:
            raise HashConfigError(f"--capacity-factor {self.capacity_factor}: must be positive")
        if not 1 <= k <= K:
            raise HashConfigError(f"--hash-topk {k}: must lie in [1, --hash-experts {K}]")
        if k > 1 and N > 1:
            raise HashConfigError(f"--hash-topk {k} with --hash-count {N}: MultiHash already "
                                  f"sends a token to {N} expert segments; use one of the two")
        self._check_score()
        if self.learned and (k > 1 or self.score != "none"):
            raise HashConfigError("--hash-topk and --hash-score need --router hash (learned routers "
                                  "choose and weigh their experts themselves)")
        if self.shared_experts < 0:
            raise HashConfigError(f"--hash-shared-experts {self.shared_experts}: must be 0 or more")
        for flag, width in (("--hash-expert-ffn-dim", self.expert_ffn_dim),
                            ("--hash-shared-ffn-dim", self.shared_ffn_dim)):
            if width < 0:
                raise HashConfigError(f"{flag} {width}: must be a positive width, or 0 for the "
                                      f"width of the FFN it replaces")
        if N < 1:
            raise HashConfigError(f"--hash-count {N}: must be at least 1")
        if self.learned and N > 1:
            raise HashConfigError(f"--hash-count {N} needs --router hash (MultiHash is a hash router)")
        if ffn_dim is not None:
            self._check_width(ffn_dim, ffn_flag)
        if self.dispatch not in ("alltoall", "alltoall-exact", "fairscale"):
            raise HashConfigError(f"--moe-dispatch {self.dispatch!r} is unknown; valid: alltoall, "
                                  f"alltoall-exact, fairscale")
        P = self.parallel_size_for(world_size)
        self._check_offload(P)
        if world_size > 1:
            if self.ddp_backend is not None and self.ddp_backend not in EXPERT_SAFE_BACKENDS:
                raise HashConfigError(
                    f"--ddp-backend {self.ddp_backend} cannot keep hash-layer experts correct on "
                    f"several ranks; use --ddp-backend legacy_ddp (CPU or GPU) or pytorch_ddp (GPU)")
            if self.router == "base" and P > 1:
                raise HashConfigError(
                    "--router base solves one assignment over one process's tokens; with "
                    "experts on several ranks use --router hash, switch or top2, or "
                    "--moe-expert-parallel-size 1 (every expert on every rank)")
            self._check_collectives(P)

    def _check_collectives(self, P: int):
        """Refuse what would make ranks take different paths through a step.

        Every rank must run the expert collectives in the same order: the
        exchange's all-to-alls when P > 1, the replicas' gradient all-reduces
        in every backward when W > P.
        """
        for flag, rate in self.layerdrop:
            if rate:
                raise HashConfigError(
                    f"{flag} {rate}: LayerDrop skips layers at random on each rank, and the "
                    f"ranks' expert collectives would no longer pair up; use 0 with hash "
                    f"layers on several ranks")
        if P > 1 and self.store_ema:
            raise HashConfigError(
                f"--store-ema copies the model, and with experts spread over ranks (P = {P}) "
                f"it holds process groups that cannot be copied; drop --store-ema, or use "
                f"--moe-expert-parallel-size 1")
        spread = (f"with experts spread over ranks (P = {P}) each rank holds other experts; "
                  f"drop it, or use --moe-expert-parallel-size 1 (every expert on every rank)")
        if P > 1 and self.zero_sharding != "none":
            raise HashConfigError(
                f"--zero-sharding {self.zero_sharding}: fairscale's OSS takes every rank's "
                f"parameters for replicas of one list and broadcasts each shard from its owner, "
                f"but {spread}")
        if P > 1 and self.use_bmuf:
            raise HashConfigError(
                f"--use-bmuf averages every parameter over all ranks, but {spread}")
        if P > 1 and self.eval_bleu:
            raise HashConfigError(
                f"--eval-bleu decodes each rank's sentences for as many steps as they need, "
                f"and with experts spread over ranks (P = {P}) every step is an all-to-all of "
                f"all ranks; drop --eval-bleu (score with fairseq-generate on the checkpoint), "
                f"or use --moe-expert-parallel-size 1")

    def _check_offload(self, parallel_size: int):
        from .offload import check_offload_mode, parse_cache_size

        check_offload_mode(self.offload_experts)
        parse_cache_size(self.expert_cache)
        if self.offload_experts == "none":
            return
        if self.num_hashes > 1:
            raise HashConfigError("--hash-offload-experts does not support --hash-count > 1 "
                                  "(MultiHash); use --hash-offload-experts none")
        if parallel_size > 1:
            raise HashConfigError("--hash-offload-experts serves on one process; use "
                                  "--moe-expert-parallel-size 1 or no offload")

    def _check_score(self):
        if self.score not in SCORES:
            raise HashConfigError(f"--hash-score {self.score!r} is unknown; valid: {', '.join(SCORES)}")
        if self.score == "softmax" and self.topk == 1:
            raise HashConfigError("--hash-score softmax over --hash-topk 1 expert is always 1; use "
                                  "sigmoid or sqrt-softplus, or --hash-topk 2 or more")
        if not self.score_scale > 0:
            raise HashConfigError(f"--hash-score-scale {self.score_scale}: must be positive")

    def _check_width(self, ffn_dim: int, ffn_flag: str):
        width = self.expert_width(ffn_dim)
        if self.expert_ffn_dim:
            ffn_flag = "--hash-expert-ffn-dim"
        if width % self.num_hashes:
            valid = [n for n in range(1, min(width, 16) + 1) if width % n == 0]
            raise HashConfigError(f"--hash-count {self.num_hashes} must divide the FFN width "
                                  f"{ffn_flag} {width}; valid counts include {valid}")

    def parallel_size_for(self, world_size: int, node_size: Optional[int] = None) -> int:
        """P, the ranks that share a layer's experts, in a world of ``world_size`` ranks.

        ``--moe-expert-parallel-size`` where given; else P = W when W divides
        K (K/W experts a rank), P = K when K divides W, cut to a divisor of
        the ranks of one node (``node_size``, by default
        :func:`~fairseq_hash.expert_parallel.layout.ranks_per_node`), so that no
        all-to-all crosses nodes (consecutive ranks share a node under
        torchrun and fairseq's spawn).
        """
        K, P = self.total_experts, self.parallel_size
        if P < 0:
            raise HashConfigError(f"--moe-expert-parallel-size {P}: must be 0 (chosen from the "
                                  f"world size) or more")
        if world_size == 1:
            if P > 1:
                raise HashConfigError(f"--moe-expert-parallel-size {P} needs {P} or more ranks; "
                                      f"this is one process")
            return 1
        if P:
            if K % P or world_size % P:
                raise HashConfigError(f"--moe-expert-parallel-size {P} must divide both "
                                      f"--hash-experts {K} and the world size {world_size}")
            return P
        node = node_size or ranks_per_node(world_size)
        if K % world_size == 0:
            return math.gcd(world_size, node)
        if world_size % K == 0:
            return math.gcd(K, node)
        raise HashConfigError(
            f"--hash-experts {K} and a world of {world_size} ranks: neither divides the other; "
            f"set --moe-expert-parallel-size P to a P that divides both")


def run_setting(args, section: str, name: str):
    """A flag of the whole run (``section.name`` in fairseq's config), wherever
    this kind of model config keeps it; None where it has none."""
    value = getattr(args, name, None)  # argparse-style models see every flag
    if value is None and OmegaConf.is_config(args) and args._get_parent() is not None:
        # a dataclass model's config is one node of fairseq's whole config
        value = OmegaConf.select(args._get_parent(), f"{section}.{name}")
    return value


def ddp_backend_of(args) -> Optional[str]:
    """fairseq's --ddp-backend, wherever this kind of model config keeps it."""
    return run_setting(args, "distributed_training", "ddp_backend")
