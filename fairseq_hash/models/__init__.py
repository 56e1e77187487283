from . import hash_transformer_lm  # noqa: F401
