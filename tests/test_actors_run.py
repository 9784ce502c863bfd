"""``mlxrunner run`` over the actor tree: output, flags, Ctrl-C, broken pipes, bad input."""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import trio
import trio.testing

from actors.config import Loaded
from actors.testing import ScriptedEngine, fake_info, scripted_load, tiny_tokenizer
from cli import run as run_command
from cli.main import build_parser
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import SequenceRequest
from runtime.errors import ModelNotFoundError

TOK = tiny_tokenizer()
ROOT = Path(__file__).resolve().parents[1]


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "fake", *argv])


def _spell(text: str) -> Callable[[SequenceRequest], list[int]]:
    return lambda request: TOK.encode(text)


def _endless(request: SequenceRequest) -> list[int]:
    return TOK.encode("a") * request.max_tokens


async def _run(
    engine: ScriptedEngine, *argv: str, out: io.StringIO | None = None
) -> tuple[int, str, str]:
    args = _args(*argv)
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    code = await run_command.run(
        args,
        run_command.build_request(args),
        load=scripted_load(engine, TOK),
        out=out,
        err=err,
    )
    return code, out.getvalue(), err.getvalue()


async def test_streams_the_text_and_ends_the_line() -> None:
    engine = ScriptedEngine(_spell(" the capital of France is Paris"))
    code, out, _ = await _run(engine, "Hi")
    assert code == 0
    assert out == " the capital of France is Paris\n"
    assert engine.last_request.prompt == tuple(TOK.encode("Hi"))


async def test_flags_reach_the_request() -> None:
    engine = ScriptedEngine(_spell(" one two three four"))
    argv = ["--temperature", "0", "--top-k", "3", "--seed", "7", "--num-predict", "3", "Hi"]
    code, out, _ = await _run(engine, *argv)
    assert code == 0
    request = engine.last_request
    assert request.max_tokens == 3
    assert request.sampling == SamplingOptions(temperature=0.0, top_k=3, seed=7)
    assert out == TOK.decode(TOK.encode(" one two three four")[:3]) + "\n"


async def test_stop_flag_ends_the_text_before_the_stop_string() -> None:
    engine = ScriptedEngine(_spell(" one two three four"))
    code, out, _ = await _run(engine, "--stop", "three", "Hi")
    assert code == 0
    assert out == " one two \n"


async def test_chat_flag_applies_the_template() -> None:
    engine = ScriptedEngine(_spell(" ok"))
    await _run(engine, "--chat", "Hi")
    templated = TOK.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert engine.last_request.prompt == tuple(TOK.encode(templated))


class _InterruptOnFirstWrite(io.StringIO):
    """A terminal whose user presses Ctrl-C as soon as the first text appears."""

    def write(self, s: str) -> int:
        if not self.getvalue():
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(s)


async def test_ctrl_c_leaves_the_stream_and_frees_the_sequence() -> None:
    engine = ScriptedEngine(_endless, context_length=100_000)
    code, out, _ = await _run(engine, "Hi", out=_InterruptOnFirstWrite())
    assert code == run_command.EXIT_INTERRUPTED
    assert out.startswith("a")
    assert out.endswith("a\n")  # the line is ended, not cut
    assert engine.steps < 100_000 // 2  # stopped, not run to the end of the context


async def test_ctrl_c_while_loading_stops_without_generating() -> None:
    engine = ScriptedEngine()
    loading = trio.Event()
    release = threading.Event()
    token = trio.lowlevel.current_trio_token()

    def slow_load(progress: Callable[[float], None]) -> Loaded:
        progress(0.5)
        trio.from_thread.run_sync(loading.set, trio_token=token)
        release.wait()
        return Loaded(engine=engine, tokenizer=TOK, info=fake_info())

    args = _args("Hi")
    err = io.StringIO()
    codes: list[int] = []

    async def command() -> None:
        request = run_command.build_request(args)
        code = await run_command.run(args, request, load=slow_load, out=io.StringIO(), err=err)
        codes.append(code)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(command)
            await loading.wait()
            os.kill(os.getpid(), signal.SIGINT)
            await trio.testing.wait_all_tasks_blocked()
            release.set()  # the load cannot be interrupted; it finishes, then the tree closes
    finally:
        release.set()
    assert codes == [run_command.EXIT_INTERRUPTED]
    assert engine.added == []
    assert "loading" in err.getvalue()


class _ClosedPipe(io.StringIO):
    """stdout piped into ``head``, which exits after the first piece."""

    def write(self, s: str) -> int:
        if self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(s)


async def test_a_reader_that_leaves_stops_the_generation() -> None:
    engine = ScriptedEngine(_endless, context_length=100_000)
    code, _, _ = await _run(engine, "Hi", out=_ClosedPipe())
    assert code == run_command.EXIT_BROKEN_PIPE
    assert engine.steps < 100_000 // 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "2"], "argument --top-p: must be <= 1"),
        (["--temperature", "-1"], "argument --temperature: must be >= 0"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["--num-predict", "-5"], "argument --num-predict: must be >= -1"),
        (["--parallel", "0"], "argument --parallel: must be >= 1"),
        (["--ctx", "0"], "argument --ctx: must be >= 1"),
    ],
)
def test_bad_flags_exit_1_before_loading(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _args(*flags, "Hi")
    assert exit_info.value.code == run_command.EXIT_ERROR
    assert message in capsys.readouterr().err


async def test_a_failed_load_fails_the_command() -> None:
    def missing(progress: Callable[[float], None]) -> Loaded:
        raise ModelNotFoundError("model 'nope' not found")

    args = _args("Hi")
    with pytest.RaisesGroup(ModelNotFoundError, flatten_subgroups=True):
        await run_command.run(
            args,
            run_command.build_request(args),
            load=missing,
            out=io.StringIO(),
            err=io.StringIO(),
        )


def test_cli_reports_a_missing_model_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            "--models-dir",
            str(tmp_path),
            str(missing),
            "Hi",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    assert "Traceback" not in result.stderr


# A child process running the real command line with the model load replaced: ``endless``
# streams "a" forever; ``stuck`` never finishes loading.
_CHILD = """
import sys, threading
import runtime
import actors.loading
from actors.testing import ScriptedEngine, scripted_load, tiny_tokenizer
from cli.main import main

def endless(request):
    return tiny_tokenizer().encode("a") * request.max_tokens

def stuck_load(progress):
    progress(0.5)
    threading.Event().wait()

kind = sys.argv[1]
if kind == "endless":
    engine = ScriptedEngine(endless, context_length=1_000_000)
    actors.loading.model_loader = lambda config: scripted_load(engine, tiny_tokenizer())
else:
    actors.loading.model_loader = lambda config: stuck_load
sys.exit(main(["run", "fake", *sys.argv[2:]]))
"""


def _child(kind: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, kind, *(argv or ("Hi",))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(stream: IO[str], text: str) -> None:
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"the child exited before printing {text!r}")


def test_ctrl_c_in_a_terminal_stops_the_stream_cleanly() -> None:
    child = _child("endless")
    try:
        assert child.stdout is not None
        first = child.stdout.read(1)  # streaming has begun
        child.send_signal(signal.SIGINT)
        rest, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == run_command.EXIT_INTERRUPTED
    out = first + rest
    assert out.endswith("a\n")  # the line is ended, nothing cut or garbled
    assert set(out.strip()) == {"a"}
    assert "Traceback" not in err


def test_a_second_ctrl_c_quits_a_load_at_once() -> None:
    child = _child("stuck")
    try:
        assert child.stderr is not None
        _read_until(child.stderr, "load")
        child.send_signal(signal.SIGINT)
        _read_until(child.stderr, "Ctrl-C again")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == run_command.EXIT_INTERRUPTED
    assert out == ""
    assert "interrupted" in err
    assert "Traceback" not in err


def test_a_prompt_error_is_one_line_and_exit_1() -> None:
    child = _child("endless", "")
    out, err = child.communicate(timeout=60)
    assert child.returncode == 1
    assert out == ""
    assert err.strip().splitlines()[-1].startswith("Error: empty prompt")
    assert "Traceback" not in err


async def test_a_dash_reads_the_prompt_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi from a pipe"))
    engine = ScriptedEngine(_spell(" ok"))
    code, out, _ = await _run(engine, "-")
    assert code == 0
    assert out == " ok\n"
    assert engine.last_request.prompt == tuple(TOK.encode("Hi from a pipe"))
