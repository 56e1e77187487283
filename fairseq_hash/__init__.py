"""fairseq-hash: Hash Layers (Roller et al., NeurIPS 2021) as a fairseq --user-dir plugin."""
from .huge_pages import request_huge_pages

request_huge_pages()  # before any tensor exists: torch reads it once

from .errors import install_excepthook  # noqa: E402
from . import criterions, hashing, models, optim  # noqa: F401,E402  (registers hash functions, models, criterions)

install_excepthook()
