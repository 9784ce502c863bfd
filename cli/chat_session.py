"""What the interactive ``mlxrunner run`` does with each line the user types, apart from I/O.

``ChatSession`` owns the conversation (the system message and the turns so far), the
generation options that ``/set parameter`` changes, and the ``\"\"\"`` multi-line block being
typed. ``feed`` turns one line into one action for the loop (``cli.chat``) to carry out: ask the
model, print a reply, or leave. Only a completed answer joins the history (``answered``), so a
turn stopped with Ctrl-C leaves the conversation as it was before it.

The commands follow ``ollama run``: ``/bye``, ``/clear``, ``/set parameter NAME VALUE``,
``/set system TEXT``, ``/show parameters|system|info``, ``/?``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import attrs

from actors.messages import ChatMessage, GenerateRequest, GenerationOptions
from runtime.engine.options import SamplingOptions
from runtime.errors import OptionsError

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

HELP = """\
Available commands:
  /set parameter NAME VALUE   set a generation option (/set parameter for the list)
  /set system TEXT            set the system message
  /show parameters|system|info
  /clear                      forget the conversation so far
  /bye                        leave (Ctrl-D too)
  /?                          this help

Use \"\"\" to begin and end a message of several lines.
Ctrl-C stops an answer; the conversation goes on."""

# Ollama's option names that a chat may set, by the type of their value.
_INT_PARAMETERS = ("top_k", "seed", "num_predict", "num_ctx", "repeat_last_n")
_FLOAT_PARAMETERS = tuple(
    f.name for f in attrs.fields(SamplingOptions) if f.name not in _INT_PARAMETERS
)
PARAMETERS = (*_FLOAT_PARAMETERS, *_INT_PARAMETERS, "stop")

PARAMETER_HELP = "Parameters: " + ", ".join(PARAMETERS) + "\n(e.g. /set parameter temperature 0)"


@attrs.frozen
class Ask:
    """Send ``request`` to the model; on a complete answer, call ``answered(user, text)``."""

    request: GenerateRequest
    user: str


@attrs.frozen
class Say:
    """Print ``text`` (a command's reply); the session goes on."""

    text: str


@attrs.frozen
class ShowInfo:
    """Print the loaded model's description (the loop has the client that knows it)."""


@attrs.frozen
class Leave:
    pass


@attrs.frozen
class More:
    """The line belongs to an unfinished ``\"\"\"`` block: read another."""


Action = Ask | Say | ShowInfo | Leave | More


def options_from(parameters: Mapping[str, Any]) -> GenerationOptions:
    """``GenerationOptions`` from Ollama-named parameters; raises ``OptionsError``."""
    num_predict = parameters.get("num_predict")
    num_ctx = parameters.get("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise OptionsError("num_ctx must be >= 1")
    return GenerationOptions(
        sampling=SamplingOptions.from_dict(parameters),
        # As in Ollama: zero or below means until the model stops or the context is full.
        num_predict=num_predict if num_predict is not None and num_predict > 0 else -1,
        stop=tuple(parameters.get("stop", ())),
        num_ctx=num_ctx,
    )


def _parse_value(name: str, text: str) -> int | float:
    try:
        return int(text) if name in _INT_PARAMETERS else float(text)
    except ValueError:
        kind = "a whole number" if name in _INT_PARAMETERS else "a number"
        raise OptionsError(f"{name} must be {kind}, got {text!r}") from None


@attrs.define
class ChatSession:
    """The conversation and its settings; see the module docstring."""

    parameters: dict[str, Any] = attrs.field(factory=dict)
    system: str | None = None
    history: list[ChatMessage] = attrs.field(factory=list)
    _block: list[str] | None = None  # the lines of an open \"\"\" block

    def __attrs_post_init__(self) -> None:
        options_from(self.parameters)  # refuse bad flags before the first turn

    @property
    def prompt(self) -> str:
        return PROMPT if self._block is None else CONTINUATION

    def feed(self, line: str) -> Action:
        """The action for one typed line (without its line end)."""
        if self._block is not None:
            if not line.rstrip().endswith(BLOCK):
                self._block.append(line)
                return More()
            if last := line.rstrip().removesuffix(BLOCK):
                self._block.append(last)
            text, self._block = "\n".join(self._block), None
            return self._ask(text)
        stripped = line.strip()
        if stripped.startswith(BLOCK):
            rest = stripped.removeprefix(BLOCK)
            if rest.endswith(BLOCK):  # """one line"""
                return self._ask(rest.removesuffix(BLOCK))
            self._block = [rest] if rest else []
            return More()
        if stripped.startswith("/"):
            return self._command(stripped)
        if not stripped:
            return More()
        return self._ask(line)

    def answered(self, user: str, answer: str) -> None:
        """A turn completed: both sides join the history (the next prompt starts with it, so
        the scheduler's prefix cache finds it already computed)."""
        self.history += [
            ChatMessage(role="user", content=user),
            ChatMessage(role="assistant", content=answer),
        ]

    def _ask(self, text: str) -> Action:
        if not text.strip():
            return More()
        messages = [ChatMessage(role="system", content=self.system)] if self.system else []
        messages += [*self.history, ChatMessage(role="user", content=text)]
        request = GenerateRequest(messages=tuple(messages), options=options_from(self.parameters))
        return Ask(request, text)

    def _command(self, line: str) -> Action:
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command in ("/bye", "/exit"):
            return Leave()
        if command in ("/?", "/help"):
            return Say(HELP)
        if command == "/clear":
            self.history.clear()
            return Say("Cleared session context")
        if command == "/set":
            return self._set(rest)
        if command == "/show":
            return self._show(rest)
        return Say(f"Unknown command '{command}'. Type /? for help")

    def _set(self, rest: str) -> Action:
        what, _, value = rest.partition(" ")
        if what == "system":
            self.system = value.strip().strip('"') or None
            return Say("Set system message." if self.system else "Cleared system message.")
        if what != "parameter":
            return Say("Usage: /set parameter NAME VALUE, or /set system TEXT")
        try:
            words = shlex.split(value)
        except ValueError as exc:
            return Say(f"Couldn't set parameter: {exc}")
        if len(words) < 2:
            return Say(PARAMETER_HELP)
        name, values = words[0], words[1:]
        if name not in PARAMETERS:
            return Say(f"Unknown parameter '{name}'. {PARAMETER_HELP}")
        updated = dict(self.parameters)
        try:
            if name == "stop":
                updated[name] = values
            elif len(values) != 1:
                raise OptionsError(f"{name} takes one value")
            else:
                updated[name] = _parse_value(name, values[0])
            options_from(updated)
        except OptionsError as exc:
            return Say(f"Couldn't set parameter: {exc}")
        self.parameters = updated
        return Say(f"Set parameter '{name}' to '{', '.join(values)}'")

    def _show(self, rest: str) -> Action:
        if rest == "info":
            return ShowInfo()
        if rest == "system":
            return Say(self.system or "No system message was specified.")
        if rest == "parameters":
            if not self.parameters:
                return Say("No parameters were set: the defaults apply.")
            width = max(len(name) for name in self.parameters)
            lines = [
                f"{name:<{width}}  {', '.join(map(str, v)) if isinstance(v, list) else v}"
                for name, v in self.parameters.items()
            ]
            return Say("Parameters:\n" + "\n".join(lines))
        return Say("Usage: /show parameters|system|info")
