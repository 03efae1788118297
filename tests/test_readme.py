"""The README is the contract: every CLI command is documented there, and `.ci/run` runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from edge_rnn.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> list[str]:
    """Every command path of the typer app: `infer`, `train mnist-lstm`, …"""
    group = typer.main.get_command(app)
    paths = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        paths += [f"{name} {sub}" for sub in subcommands] if subcommands else [name]
    return sorted(paths)


def test_the_app_has_the_commands_this_test_walks():
    assert {"export", "infer", "stream", "train mnist-lstm", "train char-rnn"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_in_the_readme(command):
    assert f"edge-rnn {command}" in README, f"the README never shows `edge-rnn {command}`"


def test_ci_runs_the_readme_test_command_verbatim():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert "sudo" not in test_command and "apt-get" not in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_runs_the_readme_arm_check_verbatim():
    """Issue 19: the ARM check is its own README command, and CI runs exactly that command after the tests."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    arm_command = next(b for b in blocks if "arm64_check.sh" in b and "demo-broken" not in b)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert arm_command in ci
    assert ci.index(arm_command) > ci.index("python -m pytest"), "the ARM check runs after the tests"
