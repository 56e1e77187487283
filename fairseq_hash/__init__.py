"""fairseq-hash: Hash Layers (Roller et al., NeurIPS 2021) as a fairseq --user-dir plugin."""
from .errors import install_excepthook
from . import criterions, hashing, models  # noqa: F401  (registers hash functions, models, criterions)

install_excepthook()
