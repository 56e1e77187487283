"""fairseq's moving average of the weights (``--store-ema``) on hash models.

fairseq's ``EMA._step_internal`` (``fairseq/models/ema/ema.py``) decays every
tensor of the model's state dict in place, ``ema.mul_(decay)``, which stops
the first update for an integer tensor (``result type Float can't be cast to
the desired output type Long``): a hash layer's table, its dictionary
fingerprint and hash type are integer buffers. An average of them would mean
nothing anyway: they never change. :func:`install_ema_copies_integers` makes
fairseq's EMA copy them as its ``skip_keys`` (copied at every EMA step, never
averaged); floating tensors are averaged as fairseq does, so a dense model's
EMA is unchanged.

fairseq saves the EMA weights in the checkpoint's ``extra_state["ema"]`` (and
``extra_state["ema_fp32_params"]`` with ``--ema-fp32``);
``fairseq-hash-consolidate --ema`` writes them as a checkpoint of their own,
which fairseq-eval-lm and fairseq-generate score.
"""
import functools

import torch


def integer_keys(model) -> set:
    """State-dict keys of ``model`` whose tensors are not floating point."""
    return {key for key, value in model.state_dict().items()
            if torch.is_tensor(value) and not value.is_floating_point()}


def install_ema_copies_integers():
    from fairseq.models.ema import EMA

    if getattr(EMA.__init__, "_fairseq_hash", False):
        return
    init = EMA.__init__

    @functools.wraps(init)
    def __init__(self, model, config, device=None, skip_keys=None):
        init(self, model, config, device=device, skip_keys=skip_keys)
        self.skip_keys = set(self.skip_keys) | integer_keys(model)

    __init__._fairseq_hash = True
    EMA.__init__ = __init__
