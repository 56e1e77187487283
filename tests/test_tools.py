"""Every console script: installed from the one table, --help works, every flag has a sentence."""
import contextlib
import importlib
import importlib.metadata
import io
import re

import pytest

from fairseq_hash.cli.fairseq_runner import fairseq_argv
from fairseq_hash.cli.tools import TOOLS


def help_text(tool):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
        importlib.import_module(TOOLS[tool]).main(["--help"])
    assert exit.value.code == 0
    return out.getvalue()


def flag_helps(text):
    """{flag: its help text} of an argparse ``--help`` page."""
    helps, current = {}, None
    for line in text.splitlines():
        entry = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if entry:
            current = re.split(r"[ ,]", entry.group(1))[0]
            helps[current] = entry.group(2) or ""
        elif current and line.startswith("     "):
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


def test_the_installed_console_scripts_are_the_table_of_tools():
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("fairseq-hash-")}
    assert installed == {name: f"{module}:main" for name, module in TOOLS.items()}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_tool_runs_as_its_module_and_its_help_exits_0(tool):
    assert fairseq_argv(tool, ["x"])[1:] == ["-m", TOOLS[tool], "x"]
    assert help_text(tool).startswith(f"usage: {tool}")


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_flag_of_a_tool_has_a_sentence_of_help(tool):
    helps = flag_helps(help_text(tool))
    assert "-h" in helps
    for flag, text in helps.items():
        # what the help says beyond its default and its preset values
        words = re.sub(r"\(default[^)]*\)|\[[^]]*\]", "", text).lower().split()
        assert len(words) >= 2 and words != flag.strip("-").split("-"), (flag, text)


def test_flag_helps_reads_flags_with_values_and_wrapped_help():
    page = ("usage: x\n\noptions:\n  -h, --help            show this help message and exit\n"
            "  --tokens S [S ...]    tokens per step\n  --experts K\n"
            "                        numbers of experts\n                        to compare\n"
            "  --quiet\n")
    assert flag_helps(page) == {"-h": "show this help message and exit",
                                "--tokens": "tokens per step",
                                "--experts": " numbers of experts to compare", "--quiet": ""}
