"""Every command the README shows is one the CLI accepts (tests/test_readme_runs.py runs them).

A README command that no longer parses (``calibrate ... -o FILE`` once failed: ``--output``
had no ``-o``) is a newcomer's first error, so each ``anomalyclip`` line of the README's
shell blocks, continuation lines joined, goes through the real parser here.
"""

from __future__ import annotations

import pytest

from anomalyclip.cli import build_parser
from tests.helpers import cli_arguments, readme_commands


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
