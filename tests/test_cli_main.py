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

COMMANDS = ("serve", "run", "import", "list", "show", "rm", "ps")


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


def _numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, type's kind) for every number flag of every command."""
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    found = []
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.type in (int, float):
                assert action.choices, f"{command} {action.option_strings}: use cli.numbers"
            qualname = getattr(action.type, "__qualname__", "")
            kind = qualname.split(".")[0]
            if kind in ("integer", "number"):
                found.append((command, action.option_strings[-1], kind))
    return found


NUMERIC_FLAGS = _numeric_flags()


def test_every_number_flag_is_checked_at_parse_time() -> None:
    flags = {(command, flag) for command, flag, _ in NUMERIC_FLAGS}
    for flag in ("--grace", "--cache-gb", "--ctx", "--parallel", "--port", "--max-queue"):
        assert ("serve", flag) in flags
    for flag in ("--temperature", "--top-p", "--min-p", "--repeat-penalty", "--num-predict"):
        assert ("run", flag) in flags


@pytest.mark.parametrize(("command", "flag", "kind"), NUMERIC_FLAGS)
def test_number_flags_refuse_nan_and_inf_with_one_line(
    command: str, flag: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    positional = {"run": ["m", "hi"]}.get(command, [])
    for value in ("nan", "inf", "-inf", "NaN", "1e999", "x"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, f"{flag}={value}", *positional])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[-1].startswith(f"Error: argument {flag}: must be")
        assert err[-1].endswith(f"(see 'mlxrunner {command} --help')")
        assert repr(value) in err[-1]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--grace", "-1", "must be >= 0"),
        ("--cache-gb", "0", "must be > 0"),
        ("--port", "65536", "must be in 0..65535"),
        ("--port", "-1", "must be in 0..65535"),
        ("--parallel", "0", "must be >= 1"),
        ("--max-body", "-5", "must be >= 1"),
    ],
)
def test_meaningless_serve_numbers_are_refused(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", f"{flag}={value}"])
    assert message in capsys.readouterr().err


def test_good_numbers_parse() -> None:
    args = build_parser().parse_args(
        ["serve", "--grace", "0", "--cache-gb", "0.5", "--port", "0", "--ctx", "8192"]
    )
    assert (args.grace, args.cache_gb, args.port, args.ctx) == (0.0, 0.5, 0, 8192)
    args = build_parser().parse_args(["run", "m", "--seed", "-1", "--num-predict", "-1", "hi"])
    assert (args.seed, args.num_predict) == (-1, -1)
