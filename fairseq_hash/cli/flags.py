"""``fairseq-hash-help``: the flags this plugin adds to fairseq, with their help.

fairseq's ``--help`` prints before the model's own flags are added to its
parser (for every ``--arch``, fairseq's own included), so this command lists
ours: ``fairseq-hash-help`` (or ``fairseq-hash-help --arch hash_transformer_lm``),
and those of ``--optimizer fused_adamw``.
"""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-hash-help", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="hash_transformer_lm",
                        help="architecture whose hash-layer flags to list (default hash_transformer_lm)")
    args = parser.parse_args(argv)

    import fairseq_hash  # noqa: F401  (registers the models)
    from fairseq.dataclass.utils import gen_parser_from_dataclass
    from fairseq.models import ARCH_MODEL_REGISTRY

    from fairseq_hash.models.hash_transformer_lm import HashLayerConfig
    from fairseq_hash.optim.fused_adamw import FusedAdamWConfig

    if args.arch not in ARCH_MODEL_REGISTRY:
        raise SystemExit(f"fairseq-hash-help: error: --arch {args.arch} is not registered")
    flags = argparse.ArgumentParser(
        prog=f"fairseq-train DATA --user-dir $(fairseq-hash-user-dir) --arch {args.arch}",
        add_help=False, usage=argparse.SUPPRESS)
    gen_parser_from_dataclass(flags.add_argument_group("hash layers"), HashLayerConfig())
    gen_parser_from_dataclass(
        flags.add_argument_group("--optimizer fused_adamw (fairseq's adam in one fused pass)"),
        FusedAdamWConfig())
    flags.print_help()


if __name__ == "__main__":
    main()
