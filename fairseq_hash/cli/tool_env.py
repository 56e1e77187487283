"""How our commands start fairseq's command-line tools: the environment, the optimizers."""
import os
import sys

# the --optimizer values our commands offer fairseq-train: fairseq's own, and ours
TRAIN_OPTIMIZERS = ("adam", "fused_adamw")
OPTIMIZER_HELP = ("adam, or fused_adamw, the same update in one fused pass, faster where "
                  "experts hold most parameters")


def tool_env(**overrides: str) -> dict:
    """os.environ, with fairseq-preprocess and friends on PATH and warnings quiet."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")  # torch's and fairscale's deprecation notices
    # the tools live beside this interpreter, which need not be on PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(overrides)
    return env
