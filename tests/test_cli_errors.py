"""Every command's user errors, as ``mlxrunner`` prints them: one ``Error: ...`` line on
stderr, exit status 1, no traceback; and no command at all prints the help."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse, and `run` (which exits through SystemExit)
        return int(exit_info.code or 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
        (["run"], "the following arguments are required: MODEL (see 'mlxrunner run --help')"),
        (["run", "m", "hi", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "m", "--top-k=-1", "hi"], "argument --top-k: must be >= 0, got '-1'"),
        (["serve", "--port", "99999"], "argument --port: must be in 0..65535"),
        (["import", "a", "b", "--quantize", "q5"], "argument --quantize: invalid choice: 'q5'"),
        (["ps", "--port", "x"], "argument --port: must be a whole number, got 'x'"),
        (["show", "nosuch"], "model 'nosuch:latest' not found"),
        (["rm", "nosuch"], "model 'nosuch:latest' not found"),
        (["import", "/nonexistent", "x"], "/nonexistent: no such model folder or .gguf file"),
        (["import", "/nonexistent", "bad::name"], "invalid model name 'bad::name'"),
        (["run", "nosuch:model", "hi"], "model 'nosuch:model' not found"),
        (["serve", "--model", "nosuch", "--port", "0"], "model 'nosuch:latest' not found"),
    ],
)
def test_a_user_error_is_one_line_and_exit_1(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLXRUNNER_HOME", str(tmp_path))
    assert _main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "Error" in line]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("Error: ")
    assert message in errors[0]
    assert captured.err.splitlines()[-1] == errors[0]
    assert "Traceback" not in captured.err


def test_no_command_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mlxrunner")
    assert "examples:" in out
