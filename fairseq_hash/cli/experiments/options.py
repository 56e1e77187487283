"""The experiments' size flags: presets that fill what the command line left unset.

    size = parser.add_argument_group("sizes (defaults in brackets: tiny preset, default preset)")
    add = preset_flags(size, PRESETS)
    add("--layers", type=int, help="decoder layers")      # help ends " [2, 4]"
    add_width_flags(add)                                   # --embed-dim, --ffn-dim, --heads
    args = fill_presets(parser.parse_args(argv), PRESETS)  # by --preset
    check_positive(args, ["layers"])                        # --layers 0: must be positive
    check_widths(args)                                     # --embed-dim 30 --heads 4: refused
    parse_names("--models", "dense,hash", MODELS)          # ["dense", "hash"]

``fairseq-hash-compare`` and ``fairseq-hash-finetune`` share them: two
presets each, ``tiny`` and ``default``.
"""
from ...errors import HashConfigError

PRESET_ORDER = ("tiny", "default")


def preset_flags(group, presets):
    """``group.add_argument`` whose flags end their help with their preset values `` [tiny, default]``."""
    def add(*flags, **kwargs):
        action = group.add_argument(*flags, **kwargs)
        action.help += " [" + ", ".join(str(presets[n][action.dest]) for n in PRESET_ORDER) + "]"
        return action
    return add


def fill_presets(args, presets):
    """``args`` with every flag left unset taken from ``presets[args.preset]``."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_names(flag, spec, valid):
    """The names of a comma-separated flag, in order, each once; a one-line error for others."""
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise HashConfigError(f"{flag} {spec!r}: unknown {', '.join(bad) or '(empty)'}; "
                              f"valid: {','.join(valid)}")
    return names


def check_positive(args, names):
    for name in names:
        if getattr(args, name) < 1:
            raise HashConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")


def add_width_flags(add):
    """The widths of every model of an experiment, added with ``add`` (a preset_flags)."""
    add("--embed-dim", type=int, help="model width d")
    add("--ffn-dim", type=int, help="FFN hidden width, of the dense FFN and of each expert")
    add("--heads", type=int, help="attention heads")


def check_widths(args):
    check_positive(args, ("embed_dim", "ffn_dim", "heads"))
    if args.embed_dim % args.heads:
        raise HashConfigError(f"--embed-dim {args.embed_dim} must be a multiple of --heads "
                              f"{args.heads}")
