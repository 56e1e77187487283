"""fairseq-hash: Hash Layers (Roller et al., NeurIPS 2021) as a fairseq --user-dir plugin."""
from .errors import install_excepthook
# registers the hash functions, models, criterion and optimizer
from . import criterions, hashing, models, optim  # noqa: F401

install_excepthook()
