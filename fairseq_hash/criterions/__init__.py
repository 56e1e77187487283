# registers --criterion moe_cross_entropy, moe_label_smoothed_cross_entropy,
# moe_sentence_prediction and moe_masked_lm
from . import moe_criterions, moe_cross_entropy  # noqa: F401
