from . import fused_adamw  # noqa: F401  (registers --optimizer fused_adamw)
