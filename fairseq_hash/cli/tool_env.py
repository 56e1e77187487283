"""The environment in which our commands start fairseq's command-line tools."""
import os
import sys


def tool_env(**overrides: str) -> dict:
    """os.environ, with fairseq-preprocess and friends on PATH and warnings quiet."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")  # torch's and fairscale's deprecation notices
    # the tools live beside this interpreter, which need not be on PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(overrides)
    return env
