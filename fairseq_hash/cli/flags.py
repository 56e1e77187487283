"""``fairseq-hash-help``: the flags this plugin adds to fairseq, with their help.

fairseq's ``--help`` prints before the model's own flags are added to its
parser (for every ``--arch``, fairseq's own included), so this command lists
ours: ``fairseq-hash-help`` (or ``fairseq-hash-help --arch hash_transformer``, any
architecture of hash_transformer_lm, hash_transformer or hash_roberta), and
those of ``--optimizer fused_adamw``.
"""
import argparse
import sys

from ..errors import HashConfigError
from .command import command


@command("fairseq-hash-help")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-help", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="hash_transformer_lm",
                        help="architecture whose hash-layer flags to list (default hash_transformer_lm)")
    args = parser.parse_args(argv)

    import fairseq_hash  # noqa: F401  (registers the models)
    from fairseq.dataclass.utils import gen_parser_from_dataclass
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    from fairseq_hash.models.config import (EncoderDecoderHashConfig, EncoderHashConfig,
                                            HashLayerConfig)
    from fairseq_hash.optim.fused_adamw import FusedAdamWConfig

    configs = {"hash_transformer_lm": HashLayerConfig, "hash_transformer": EncoderDecoderHashConfig,
               "hash_roberta": EncoderHashConfig}
    model = ARCH_MODEL_NAME_REGISTRY.get(args.arch)
    if model not in configs:
        hash_archs = sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m in configs)
        raise HashConfigError(f"--arch {args.arch} is not a hash-layer architecture; valid: "
                              f"{', '.join(hash_archs)}")
    flags = argparse.ArgumentParser(
        prog=f"fairseq-train DATA --user-dir $(fairseq-hash-user-dir) --arch {args.arch}",
        add_help=False, usage=argparse.SUPPRESS)
    gen_parser_from_dataclass(flags.add_argument_group("hash layers"), configs[model]())
    gen_parser_from_dataclass(
        flags.add_argument_group("--optimizer fused_adamw (fairseq's adam in one fused pass)"),
        FusedAdamWConfig())
    flags.print_help()


if __name__ == "__main__":
    sys.exit(main())
