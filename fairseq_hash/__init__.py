"""fairseq-hash: Hash Layers (Roller et al., NeurIPS 2021) as a fairseq --user-dir plugin."""
import logging
import warnings

# Where our commands are the first to import fairseq: fairscale 0.4.13 calls
# torch.cuda.amp functions that torch 2.13 deprecates, and fairseq's
# text-to-speech task asks for tensorboardX, on import, in every command.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairscale\.")
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

from .fairseq_check import require_fairseq  # noqa: E402

require_fairseq()

from . import safe_globals  # noqa: E402,F401  (before fairseq loads any checkpoint)
from .errors import install_excepthook  # noqa: E402
# registers the hash functions, models, criterion and optimizer
from . import criterions, hashing, models, optim  # noqa: E402,F401

install_excepthook()
