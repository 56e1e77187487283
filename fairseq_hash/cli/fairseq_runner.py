"""Run one of fairseq's command-line tools (or ours), keep its log, read its metrics.

    run = run_fairseq("fairseq-train", [data_bin, "--user-dir", user_dir(), ...], "train.log")
    run.records("valid")        # fairseq's --log-format json lines: [{"valid_ppl": 77.0, ...}]
    run.parameters()            # {"shared": 1952256, "expert": 1975680}
    run.eval_lm_perplexity()    # fairseq-eval-lm's final perplexity
    run.checked()               # run, or HashConfigError: "fairseq-train failed (LAST LINE); see LOG"

Every tool runs as ``python -m fairseq_cli.NAME`` (ours, ``fairseq-hash-NAME``,
as ``python -m`` its module in tools.py) under this interpreter, so it works
whether or not the tools' scripts are on PATH. The log file starts
with ``# `` and the command as a shell line, then holds everything the tool
printed. fairseq-train's numbers come from its ``--log-format json`` lines;
two numbers fairseq prints only as text (the parameter counts, and
fairseq-eval-lm's perplexity, which has no json form) are read from their one
line each.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, List, Optional

from ..errors import HashConfigError
from .tool_env import tool_env
from .tools import TOOLS

_JSON_LINE = re.compile(r"\| ([a-z_]+(?: on '\w+' subset)?) \| (\{.*\})\s*$")
_PARAMS_LINE = re.compile(r"num\. (shared|expert) model params: ([\d,]+)")
_EVAL_LM_LINE = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+|inf|nan)")


def fairseq_argv(tool: str, args) -> List[str]:
    """``fairseq-eval-lm`` -> ``[python, -m, fairseq_cli.eval_lm, *args]``;
    ``fairseq-hash-upcycle`` -> ``[python, -m, fairseq_hash.cli.upcycle, *args]``."""
    module = TOOLS.get(tool) or "fairseq_cli." + tool[len("fairseq-"):].replace("-", "_")
    return [sys.executable, "-m", module, *map(str, args)]


def shell_line(tool: str, args) -> str:
    return " ".join(shlex.quote(str(a)) for a in [tool, *args])


class FairseqRun:
    """What one tool printed (``lines``), how it exited, and its peak resident memory."""

    def __init__(self, tool, returncode, lines, log_path, peak_rss_mb):
        self.tool, self.returncode, self.lines, self.log_path = tool, returncode, lines, log_path
        self.peak_rss_mb = peak_rss_mb

    @property
    def ok(self):
        return self.returncode == 0

    def records(self, tag: str) -> List[dict]:
        """The json lines of one kind (``train_inner``, ``valid``, ``train``), values as numbers."""
        return [record for kind, record in filter(None, map(json_record, self.lines))
                if kind == tag]

    def parameters(self) -> dict:
        """fairseq-train's ``num. shared/expert model params`` (expert 0 for a dense model)."""
        counts = {"shared": None, "expert": 0}
        for line in self.lines:
            m = _PARAMS_LINE.search(line)
            if m:
                counts[m.group(1)] = int(m.group(2).replace(",", ""))
        return counts

    def eval_lm_perplexity(self) -> Optional[float]:
        found = [float(m.group(2)) for m in map(_EVAL_LM_LINE.search, self.lines) if m]
        return found[-1] if found else None

    def last_line(self) -> str:
        text = "".join(self.lines[-3:]).strip().splitlines()
        return text[-1] if text else ""

    def checked(self, what: str = "") -> "FairseqRun":
        """This run, or a one-line error naming the tool, its last line and its log."""
        if not self.ok:
            raise HashConfigError(f"{self.tool}{' ' + what if what else ''} failed "
                                  f"({self.last_line()}); see {self.log_path}")
        return self


def json_record(line: str):
    """``(kind, {key: number})`` of one ``--log-format json`` line, or None for other lines."""
    m = _JSON_LINE.search(line)
    if not m:
        return None
    return m.group(1), {k: _number(v) for k, v in json.loads(m.group(2)).items()}


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_log(tool: str, log_path: str) -> FairseqRun:
    """A finished run's log, read back (a run that exited 0)."""
    with open(log_path, encoding="utf-8") as f:
        return FairseqRun(tool, 0, f.readlines(), log_path, None)


def run_fairseq(tool: str, args, log_path: str, on_line: Optional[Callable[[str], None]] = None,
                **env) -> FairseqRun:
    """Run ``tool`` with ``args``; its output goes to ``log_path`` and, line by line, to ``on_line``.

    ``env`` adds environment variables for the tool (e.g. ``OMP_NUM_THREADS="1"``).
    """
    lines = []
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("# " + shell_line(tool, args) + "\n")
        log.flush()
        proc = subprocess.Popen(fairseq_argv(tool, args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=tool_env(**env), bufsize=1)
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if on_line:
                on_line(line)
        # wait4, not wait: the child's own peak memory comes with its exit status
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return FairseqRun(tool, proc.returncode, lines, log_path, usage.ru_maxrss / 1024)


def device_flags() -> List[str]:
    """``--cpu`` unless torch sees a GPU: the device every one of our commands trains on."""
    import torch

    return [] if torch.cuda.is_available() else ["--cpu"]
