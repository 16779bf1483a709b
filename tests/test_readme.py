"""Every command the README shows is one the CLI accepts (tests/test_readme_runs.py runs them).

A README command that no longer parses (``calibrate ... -o FILE`` once failed: ``--output``
had no ``-o``) is a newcomer's first error, so each ``anomalyclip`` line of the README's
shell blocks, continuation lines joined, goes through the real parser here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from anomalyclip.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or not line:
                continue
            words = shlex.split(line)
            if "anomalyclip" in words and words[0] in ("anomalyclip", "torchrun"):
                commands.append(line)
    return commands


def cli_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "torchrun":
        return words[words.index("anomalyclip") + 1 :]
    return words[1:]


def test_the_readme_shows_the_main_commands():
    commands = readme_commands()
    shown = {cli_arguments(c)[0] for c in commands}
    assert {"predict", "calibrate", "serve", "train", "test"} <= shown, shown
    assert len(commands) >= 8


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    arguments = cli_arguments(command)
    parsed = build_parser().parse_args(arguments)
    assert parsed.command == arguments[0] and callable(parsed.func)
