"""The interactive ``mlxrunner run`` over the actor tree, with lines from a list instead of a
terminal: turns and their history, Ctrl-C during an answer and at the prompt, refused turns,
the prefix cache on a real tiny model, and piped stdin still answering once."""

from __future__ import annotations

import argparse
import io
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest

from actors.testing import ScriptedEngine, scripted_load, tiny_tokenizer
from actors.tree import open_runner
from cli import run as run_command
from cli.chat import LEAVE_HINT, ChatLoop
from cli.chat_session import ChatSession
from cli.main import build_parser
from runtime.engine.protocol import SequenceRequest
from runtime.testing.faults import FaultInjectingEngine, at_steps, engine_bug

TOK = tiny_tokenizer()


class Lines:
    """What the user types, one line per prompt; then Ctrl-D."""

    def __init__(self, *lines: str) -> None:
        self.lines = list(lines)
        self.prompts: list[str] = []

    def read_line(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        return self.lines.pop(0) if self.lines else None


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "fake", *argv])


def _templated(*turns: tuple[str, str]) -> tuple[int, ...]:
    text = TOK.apply_chat_template([{"role": role, "content": c} for role, c in turns])
    return tuple(TOK.encode(text))


def _prompt_text(request: SequenceRequest) -> str:
    return str(TOK.decode(list(request.prompt)))


async def _chat(
    engine: ScriptedEngine, source: Any, *argv: str, out: io.StringIO | None = None
) -> tuple[int, str]:
    args = _args(*argv)
    out = out if out is not None else io.StringIO()
    code = await run_command.run(
        args,
        run_command.build_session(args),
        load=scripted_load(engine, TOK),
        out=out,
        err=io.StringIO(),
        source=source,
    )
    return code, out.getvalue()


def _answer(text: str) -> Any:
    return lambda request: TOK.encode(text)


async def test_turns_keep_the_conversation_and_ctrl_d_leaves() -> None:
    engine = ScriptedEngine(_answer(" Paris"))
    source = Lines("The capital of France?", "And of Italy?")
    code, out = await _chat(engine, source)
    assert code == 0
    assert out == " Paris\n\n Paris\n\n\n"  # each answer, a blank line; Ctrl-D's line end
    assert engine.last_request.prompt == _templated(
        ("user", "The capital of France?"),
        ("assistant", " Paris"),
        ("user", "And of Italy?"),
    )
    assert source.prompts == [">>> "] * 3


async def test_flags_and_set_parameter_reach_the_requests() -> None:
    engine = ScriptedEngine(_answer(" one two three four"))
    source = Lines("Hi", "/set parameter num_predict 1", "Hi")
    code, out = await _chat(engine, source, "--num-predict", "2", "--temperature", "0")
    assert code == 0
    first, second = TOK.encode(" one two three four")[:2], TOK.encode(" one two three four")[:1]
    assert out.startswith(TOK.decode(first) + "\n\nSet parameter 'num_predict' to '1'\n")
    assert out.endswith(TOK.decode(second) + "\n\n\n")
    assert engine.last_request.max_tokens == 1
    assert engine.last_request.sampling.temperature == 0.0


def _endless_unless_asked_twice(request: SequenceRequest) -> list[int]:
    if "second" in _prompt_text(request):
        return TOK.encode(" ok")
    return TOK.encode("a") * request.max_tokens


class _CtrlCOnFirstAnswer(io.StringIO):
    """A terminal whose user presses Ctrl-C as soon as the first answer's text appears."""

    def write(self, s: str) -> int:
        if s == "a" and not self.getvalue():
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(s)


async def test_ctrl_c_stops_the_answer_not_the_session() -> None:
    engine = ScriptedEngine(_endless_unless_asked_twice, context_length=100_000)
    source = Lines("first", "second")
    code, out = await _chat(engine, source, out=_CtrlCOnFirstAnswer())
    assert code == 0
    answer, rest = out.split("\n\n", 1)
    assert set(answer) == {"a"}
    assert rest == " ok\n\n\n"
    assert engine.steps < 100_000 // 2  # the first answer stopped, not run to the context's end
    # The stopped turn is forgotten: the second request starts the conversation anew.
    assert engine.last_request.prompt == _templated(("user", "second"))


class _Typist:
    """At the second prompt the user presses Ctrl-C, waits for the hint, then types /bye."""

    def __init__(self) -> None:
        self.hint_shown = threading.Event()
        self.calls = 0

    def read_line(self, prompt: str) -> str | None:
        self.calls += 1
        if self.calls == 1:
            return "Hi"
        os.kill(os.getpid(), signal.SIGINT)
        assert self.hint_shown.wait(60), "no hint after Ctrl-C"  # hang guard
        return "/bye"


class _Screen(io.StringIO):
    def __init__(self, typist: _Typist) -> None:
        super().__init__()
        self.typist = typist

    def write(self, s: str) -> int:
        if LEAVE_HINT in s:
            self.typist.hint_shown.set()
        return super().write(s)


async def test_ctrl_c_at_the_prompt_says_how_to_leave() -> None:
    typist = _Typist()
    code, out = await _chat(ScriptedEngine(_answer(" hello")), typist, out=_Screen(typist))
    assert code == 0
    assert out == f" hello\n\n\n{LEAVE_HINT}\n>>> "


async def test_a_refused_turn_is_one_line_and_the_session_goes_on() -> None:
    engine = ScriptedEngine(_answer(" fine"), context_length=64)
    source = Lines("word " * 200, "/show info", "short")
    code, out = await _chat(engine, source)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Error: ")
    assert "Model" in lines[1]
    assert "fake" in out
    assert out.endswith(" fine\n\n\n")
    assert engine.last_request.prompt == _templated(("user", "short"))


async def test_an_engine_fault_ends_the_answer_with_one_line_and_the_session_goes_on() -> None:
    inner = ScriptedEngine(_answer(" one two three four five"))
    engine = FaultInjectingEngine(inner, at_steps({3: engine_bug}))
    args = _args()
    out = io.StringIO()
    code = await run_command.run(
        args,
        run_command.build_session(args),
        load=scripted_load(engine, TOK),
        out=out,
        err=io.StringIO(),
        source=Lines("first", "second"),
    )
    assert code == 0
    first, second = out.getvalue().split("\n\n", 1)
    assert first.splitlines()[-1].startswith("Error: ")
    assert second == " one two three four five\n\n\n"
    # The failed turn is forgotten.
    assert inner.last_request.prompt == _templated(("user", "second"))


async def test_bye_leaves_without_asking() -> None:
    engine = ScriptedEngine(_answer(" x"))
    code, out = await _chat(engine, Lines("/bye", "never read"))
    assert (code, out) == (0, "")
    assert engine.added == []


async def test_later_turns_reuse_the_prefix_cache(tiny_folder: Path) -> None:
    args = build_parser().parse_args(["run", str(tiny_folder), "--prefill-chunk", "8"])
    session = ChatSession(parameters={"temperature": 0, "num_predict": 6})
    source = Lines("Hello there, how are you today?", "Tell me more.", "And then?")
    async with open_runner(**run_command.runner_options(args)) as client:
        await client.wait_ready()
        await ChatLoop(client, session, source, io.StringIO()).run()
        stats = client.statistics()
    assert len(session.history) == 6
    assert stats.cache_hits_total >= 2  # turns 2 and 3 found the conversation computed
    assert stats.cache_reused_tokens_total > 0
    assert stats.prefilled_tokens_total < stats.prompt_tokens_total


def test_piped_stdin_answers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi from a pipe"))
    args = _args()
    assert not run_command.wants_chat(args, sys.stdin)
    assert run_command.build_request(args).prompt == "Hi from a pipe"


def test_a_terminal_without_a_prompt_chats() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert run_command.wants_chat(_args(), Terminal())
    assert not run_command.wants_chat(_args("a", "prompt"), Terminal())


# The real command line in a child whose terminal is a pseudo-terminal, with the model load
# replaced: the first question gets an endless answer, the one that says "second" a short one.
_TERMINAL_CHILD = """
import os, sys
# Opening the pty makes it this new session's terminal: Ctrl-C typed there is SIGINT here.
os.close(os.open(os.ttyname(0), os.O_RDWR))
import runtime
import actors.loading
from actors.testing import ScriptedEngine, scripted_load, tiny_tokenizer
from cli.main import main

tok = tiny_tokenizer()

def script(request):
    if "second" in tok.decode(list(request.prompt)):
        return tok.encode(" done")
    return tok.encode("a") * request.max_tokens

engine = ScriptedEngine(script, context_length=1_000_000)
actors.loading.model_loader = lambda config: scripted_load(engine, tok)
sys.exit(main(["run", "fake"]))
"""


class _Terminal:
    """The other side of the child's pseudo-terminal: what it shows, and what the user types."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.screen = ""
        self.seen = 0  # what a previous wait has already matched

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_for(self, text: str) -> str:
        """Read until ``text`` appears after what was already matched; returns what came."""
        while (found := self.screen.find(text, self.seen)) < 0:
            ready, _, _ = select.select([self.master], [], [], 60)
            assert ready, f"hang guard: no {text!r} in {self.screen[-300:]!r}"
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child has closed the terminal
                data = b""
            assert data, f"the child left before showing {text!r}: {self.screen[-300:]!r}"
            self.screen += data.decode(errors="replace")
        start, self.seen = self.seen, found + len(text)
        return self.screen[start : self.seen]


ROOT = Path(__file__).resolve().parents[1]


def test_in_a_terminal_ctrl_c_stops_the_answer_and_ctrl_d_leaves() -> None:
    master, slave = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", _TERMINAL_CHILD],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"},
        start_new_session=True,
    )
    os.close(slave)
    terminal = _Terminal(master)
    try:
        terminal.wait_for(">>> ")
        terminal.type(b"first\r")
        terminal.wait_for("aaaa")  # the endless answer is streaming
        terminal.type(b"\x03")  # Ctrl-C
        terminal.wait_for(">>> ")  # the answer stopped; the session goes on
        terminal.type(b"second\r")
        assert " done" in terminal.wait_for(">>> ")
        terminal.type(b"\x03")  # Ctrl-C at the prompt
        terminal.wait_for(LEAVE_HINT)
        terminal.type(b"\x04")  # Ctrl-D
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()
        os.close(master)
    assert "Traceback" not in terminal.screen


def test_a_chat_stopped_while_reading_gives_the_terminal_back() -> None:
    master, slave = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", _TERMINAL_CHILD],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"},
        start_new_session=True,
    )
    try:
        terminal = _Terminal(master)
        terminal.wait_for(">>> ")  # readline has the terminal in its own (raw) mode now
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == run_command.EXIT_INTERRUPTED
        lflags = termios.tcgetattr(slave)[3]
    finally:
        child.kill()
        child.wait()
        os.close(master)
        os.close(slave)
    assert lflags & termios.ICANON
    assert lflags & termios.ECHO
