from . import hash_roberta, hash_transformer, hash_transformer_lm  # noqa: F401
