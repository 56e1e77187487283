"""The values of ``--hash-offload-experts`` and ``--hash-expert-cache``, checked."""
import re
from typing import Tuple

from ..errors import HashConfigError

OFFLOAD_MODES = ("none", "prefetch", "demand")
# the model fields the serving tools pass through --model-overrides
OFFLOAD_FIELDS = ("hash_offload_experts", "hash_expert_cache")


def check_offload_mode(mode: str):
    if mode not in OFFLOAD_MODES:
        raise HashConfigError(f"--hash-offload-experts {mode!r} is unknown; valid: "
                              f"{', '.join(OFFLOAD_MODES)}")


def parse_cache_size(value) -> Tuple[str, float]:
    """``--hash-expert-cache``: ``("experts", n)`` for ``"16"``, ``("bytes", n)`` for ``"256MB"``.

    ``"0"`` (the default) is one layer's experts: every expert of the layer.
    """
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]B)?", text, flags=re.IGNORECASE)
    if match is None or (match.group(2) is None and "." in match.group(1)):
        raise HashConfigError(f"--hash-expert-cache {value!r}: give a number of experts (e.g. 16; "
                              f"0: one layer's experts) or a size in KB, MB or GB (e.g. 256MB)")
    number, unit = match.groups()
    if unit is None:
        return "experts", int(number)
    return "bytes", float(number) * 1024 ** ("KMG".index(unit[0].upper()) + 1)
