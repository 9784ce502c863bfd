"""``mlxrunner`` as a user meets it (``cli.main``): the help texts, and ``mlxrunner run`` on the
default model in a process of its own."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main
from runtime.engine.options import SamplingOptions

COMMANDS = ("serve", "run", "import", "list", "show", "rm")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_describes_the_program_and_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys)
    assert "MLX" in text
    assert "``" not in text  # no internal docstring
    assert "examples:" in text
    for command in COMMANDS:
        assert f"\n    {command} " in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_option_has_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    sub = subparsers.choices[command]
    assert sub.description
    for action in sub._actions:
        assert action.help, f"{command} {action.dest} has no help"
    assert "usage: mlxrunner " + command in _help(capsys, command)


def test_run_help_shows_the_real_sampling_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(capsys, "run").split())
    defaults = SamplingOptions()
    assert f"(default: {defaults.temperature})" in text
    assert f"(default: {defaults.top_k})" in text


def test_run_prints_paris(tmp_path: Path, default_gguf: Path) -> None:
    env = {**os.environ, "MLXRUNNER_HOME": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            "--model",
            str(default_gguf),
            "--temperature",
            "0",
            "--num-predict",
            "12",
            "The capital of France is",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
