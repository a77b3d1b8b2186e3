"""The README's first screen is a contract with operators, and CI runs what it says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def first_screen_commands() -> list[str]:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    return re.findall(r"```sh\n(.+?)\n```", first_screen, re.S)


def test_first_screen_gives_exactly_two_commands() -> None:
    start, test = first_screen_commands()
    assert "ignore-proxy --upstream http://127.0.0.1:8008 --listen" in start
    assert "pytest" in test and "[test]" in test


def test_ci_runs_the_readme_test_command() -> None:
    _, test = first_screen_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
