"""fairseq-hash: Hash Layers (Roller et al., NeurIPS 2021) as a fairseq --user-dir plugin."""
from .fairseq_import import import_fairseq

import_fairseq()

from . import safe_globals  # noqa: E402,F401  (before fairseq loads any checkpoint)
from .errors import install_excepthook, running_as_command  # noqa: E402
# registers the hash functions, models, criterion and optimizer
from . import criterions, hashing, models, optim  # noqa: E402,F401
from .bf16 import install_bf16_without_tpu  # noqa: E402
from .distributed_checkpoints import install_checkpoint_loading  # noqa: E402
from .ema import install_ema_copies_integers  # noqa: E402
from .offload.lookahead import install_eval_lm_lookahead  # noqa: E402
from .preemption import install_save_on_signal  # noqa: E402

# sharded and one-file checkpoints of any layout on any number of ranks, and
# experts offloaded when --model-overrides asks, before fairseq loads any
install_checkpoint_loading()
# fairseq's --store-ema copies the integer buffers (hash tables) it cannot average
install_ema_copies_integers()
# fairseq-eval-lm tells offloaded models its next batch (offload/lookahead.py)
install_eval_lm_lookahead()
# a Trainer saves checkpoint_last and exits on SIGTERM or SIGUSR1 (preemption.py)
install_save_on_signal()
# fairseq's --bf16 trains on the run's device, not on a TPU it implies (bf16.py)
install_bf16_without_tpu()

# only fairseq's tools and ours: importing the plugin leaves a program's own hook
if running_as_command():
    install_excepthook()
