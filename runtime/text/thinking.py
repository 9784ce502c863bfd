"""Thinking models: which templates support thinking, and splitting ``<think>`` out of the text.

A model thinks when its chat template says so: Qwen3's reads ``enable_thinking`` and the model
opens its reply with ``<think>...</think>``; templates such as DeepSeek R1's end the prompt in
an open ``<think>`` so the reply starts inside the block. ``ThinkingSplitter`` takes the
generated text in pieces cut anywhere (a tag may arrive over several tokens) and tells the
thinking from the content, as Ollama's thinking parser does: whitespace before ``<think>`` and
around the thinking is dropped, a reply that does not open with ``<think>`` is all content, and
only the first block counts (a later ``<think>`` is content).
"""

from __future__ import annotations

import enum

OPEN = "<think>"
CLOSE = "</think>"


def supports_thinking(template: str | None) -> bool:
    """Whether a chat template renders thinking (reads ``enable_thinking`` or spells the tag)."""
    return template is not None and ("enable_thinking" in template or OPEN in template)


def template_message(message: dict[str, object]) -> dict[str, object]:
    """A chat message as thinking templates read it: Ollama's clients send an earlier reply's
    reasoning back as ``thinking``, Qwen3's template reads ``reasoning_content``."""
    thinking = message.get("thinking")
    if isinstance(thinking, str) and "reasoning_content" not in message:
        return {**message, "reasoning_content": thinking}
    return message


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside a ``<think>`` block the template opened."""
    return prompt.rstrip().endswith(OPEN)


class _State(enum.Enum):
    LOOKING = enum.auto()  # before the reply's first text: is it a <think>?
    OPENED = enum.auto()  # after <think>: dropping whitespace
    THINKING = enum.auto()
    CLOSED = enum.auto()  # after </think>: dropping whitespace
    CONTENT = enum.auto()


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkingSplitter:
    """Splits a reply's text into (thinking, content) as it streams; see the module docstring.

    ``feed`` returns what became final of each; text that may still be part of a tag (or
    whitespace that may end the thinking) is held until the next piece or ``finish``.
    """

    def __init__(self, *, inside: bool = False) -> None:
        self._state = _State.OPENED if inside else _State.LOOKING
        self._held = ""

    @property
    def in_content(self) -> bool:
        """Whether the text now fed is content (stop strings apply to it)."""
        return self._state is _State.CONTENT

    def feed(self, text: str) -> tuple[str, str]:
        """Add generated text; return the (thinking, content) it made final."""
        buf = self._held + text
        self._held = ""
        thinking: list[str] = []
        content: list[str] = []
        while buf:
            state = self._state
            if state is _State.LOOKING:
                lead = buf.lstrip()
                if lead.startswith(OPEN):
                    buf, self._state = lead[len(OPEN) :], _State.OPENED
                elif not lead or OPEN.startswith(lead):
                    self._held = buf  # whitespace, or a tag still arriving
                    break
                else:
                    self._state = _State.CONTENT
            elif state is _State.OPENED or state is _State.CLOSED:
                buf = buf.lstrip()
                if buf:
                    self._state = _State.THINKING if state is _State.OPENED else _State.CONTENT
            elif state is _State.THINKING:
                end = buf.find(CLOSE)
                if end >= 0:
                    thinking.append(buf[:end].rstrip())
                    buf, self._state = buf[end + len(CLOSE) :], _State.CLOSED
                    continue
                # Hold a tag that may be arriving, and whitespace that may precede it.
                settled = len(buf[: len(buf) - _partial_suffix(buf, CLOSE)].rstrip())
                thinking.append(buf[:settled])
                self._held = buf[settled:]
                break
            else:
                content.append(buf)
                break
        return "".join(thinking), "".join(content)

    def finish(self) -> tuple[str, str]:
        """At the end of the generation: the held text, as (thinking, content)."""
        held, self._held = self._held, ""
        if self._state is _State.THINKING:
            return held.rstrip(), ""
        if self._state is _State.LOOKING:
            return "", held
        return "", ""
