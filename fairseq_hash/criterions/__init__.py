from . import moe_cross_entropy  # noqa: F401  (registers --criterion moe_cross_entropy)
