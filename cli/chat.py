"""The interactive ``mlxrunner run``: read a line, carry out its action, stream the answer.

``ChatLoop`` talks to the actor tree through a ``RunnerClient``, as a single HTTP client would;
what each line means is ``cli.chat_session``'s business. Lines come from a ``LineSource``
(``TerminalInput`` reads the terminal with line editing; tests pass a list), read on a worker
thread so the event loop keeps serving signals while the user types.

Ctrl-C reaches ``interrupt`` (``cli.run`` routes SIGINT here once the model is loaded): during
an answer it cancels that answer's scope, which leaves the generation (the scheduler frees its
sequence within a step) and the turn is forgotten; at the prompt it says how to leave. A
request the model refuses (a conversation longer than the context, a bad option) or an answer
the engine fails is one line on the output, and the session goes on.
"""

from __future__ import annotations

import contextlib
import sys
import termios
from typing import Any, Protocol, TextIO

import trio

from actors.messages import GenerationCut, GenerationError, RunnerClient
from cli.chat_session import Ask, ChatSession, Leave, More, Say, ShowInfo
from runtime.errors import RuntimeInputError

LEAVE_HINT = "Use Ctrl + d or /bye to exit."


class LineSource(Protocol):
    def read_line(self, prompt: str) -> str | None:
        """Blocks for the next line, without its end; ``None`` at the end of input (Ctrl-D)."""


class TerminalInput:
    """Lines typed at the terminal, with line editing and history where ``readline`` exists.

    ``restore`` puts back the terminal settings found at the start: a session stopped while a
    line is being read (SIGTERM) would otherwise leave the shell in readline's raw mode.
    """

    def __init__(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it is what gives input() its editing)
        self._fd = sys.stdin.fileno()
        try:
            self._saved: list[Any] | None = termios.tcgetattr(self._fd)
        except termios.error:  # not a terminal after all
            self._saved = None

    def read_line(self, prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    def restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


class ChatLoop:
    """One interactive session over a loaded runner; ``run`` returns when the user leaves."""

    def __init__(
        self, client: RunnerClient, session: ChatSession, source: LineSource, out: TextIO
    ) -> None:
        self._client = client
        self._session = session
        self._source = source
        self._out = out
        self._answer: trio.CancelScope | None = None

    def interrupt(self) -> None:
        """Ctrl-C: stop the answer being written; at the prompt, say how to leave."""
        if self._answer is not None:
            self._answer.cancel()
        else:
            self._write(f"\n{LEAVE_HINT}\n{self._session.prompt}")

    async def run(self) -> None:
        while True:
            # Abandoned on cancel: a thread blocked in input() cannot be interrupted, and the
            # process is leaving when this is cancelled.
            line = await trio.to_thread.run_sync(
                self._source.read_line, self._session.prompt, abandon_on_cancel=True
            )
            if line is None:  # Ctrl-D
                self._write("\n")
                return
            action = self._session.feed(line)
            if isinstance(action, Leave):
                return
            if isinstance(action, Say):
                self._write(action.text + "\n")
            elif isinstance(action, ShowInfo):
                self._write(self._describe() + "\n")
            elif isinstance(action, Ask):
                await self._answer_turn(action)
            else:
                assert isinstance(action, More)

    async def _answer_turn(self, ask: Ask) -> None:
        parts: list[str] = []
        completed = False
        with trio.CancelScope() as scope:
            self._answer = scope
            try:
                with await self._client.submit(ask.request) as generation:
                    async for item in generation.chunks:
                        if isinstance(item, GenerationCut):
                            raise item  # the tree is stopping: so is the session
                        if isinstance(item, GenerationError):
                            self._end_answer(parts, f"Error: {item}")
                            return
                        if item.content:
                            parts.append(item.content)
                            self._write(item.content)
                        completed = item.done
            except RuntimeInputError as exc:  # refused before any text: the session goes on
                self._write(f"Error: {exc}\n")
                return
            finally:
                self._answer = None
        if scope.cancelled_caught:
            self._end_answer(parts, "")
        elif completed:
            self._session.answered(ask.user, "".join(parts))
            self._end_answer(parts, "")
        else:  # the channel ended without its last chunk: the tree is stopping
            raise GenerationCut("the runner stopped during the answer")

    def _end_answer(self, parts: list[str], note: str) -> None:
        text = "".join(parts)
        ending = "" if not text or text.endswith("\n") else "\n"
        self._write(ending + (note + "\n" if note else "") + "\n")

    def _describe(self) -> str:
        info = self._client.model_info()
        rows = [
            ("name", info.name),
            ("architecture", info.model_type),
            ("parameters", f"{info.parameters:,}"),
            ("context length", str(info.context_length)),
            ("quantization", info.quantization),
        ]
        return "Model\n" + "\n".join(f"  {label:<16}{value}" for label, value in rows)

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
