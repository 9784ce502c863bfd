"""Tool calls: the model's call markup parsed out of its text, and calls sent back to templates.

Two families' formats are parsed, chosen by ``parser_for`` from the chat template and the
architecture:

- Qwen2.5/Qwen3 (Hermes style): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number of them, with content around them.
- Llama 3.x: the message is one or more JSON calls, ``{"name": ..., "parameters": {...}}``
  (a list of them, or several separated by ``;``), optionally after ``<|python_tag|>``.

Parsers are fed the generation's text piece by piece and return what is known so far: content
safe to show and the calls completed. Text that may still turn into a call is held back, so
call markup never leaks into content. Markup that does not hold a call (malformed JSON, no
``name``, a tag left open when the generation ends) is given back as content verbatim: the
client sees what the model wrote rather than losing it.

``template_tool_calls`` is the other direction: OpenAI clients send a call's ``arguments`` as
a JSON string, while Qwen's and Llama's templates want a mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

QWEN_OPEN = "<tool_call>"
QWEN_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@attrs.frozen
class ToolCall:
    name: str
    arguments: Mapping[str, Any]


@attrs.frozen
class Parsed:
    """What a piece of text turned out to be: content to show, and the calls it completed."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()


class ToolCallParser(Protocol):
    def feed(self, text: str) -> Parsed:
        """The content and calls known once ``text`` is appended."""
        ...

    def finish(self) -> Parsed:
        """The generation ended: whatever was held back."""
        ...


def as_call(value: Any) -> ToolCall | None:
    """A call from decoded JSON: ``name`` and ``arguments`` (Qwen) or ``parameters`` (Llama);
    arguments given as a JSON string are decoded. ``None`` when it is not a call."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ToolCall(name=name, arguments=args)


def _held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class QwenToolCallParser:
    """``<tool_call>{json}</tool_call>`` blocks. Whitespace next to a call is dropped (the
    model puts newlines between calls), so a reply of calls only has empty content."""

    def __init__(self) -> None:
        self._held = ""
        self._inside = False
        self._after_call = False  # strip whitespace at the start of the next content

    def feed(self, text: str) -> Parsed:
        buf = self._held + text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._inside:
                end = buf.find(QWEN_CLOSE)
                if end < 0:
                    self._held = buf
                    break
                body, buf = buf[:end], buf[end + len(QWEN_CLOSE) :]
                self._inside = False
                call = _decode_call(body)
                if call is None:
                    content.append(QWEN_OPEN + body + QWEN_CLOSE)
                else:
                    calls.append(call)
                    self._after_call = True
                continue
            if self._after_call:
                buf = buf.lstrip()
                if not buf:
                    self._held = ""
                    break
                self._after_call = False
            start = buf.find(QWEN_OPEN)
            if start >= 0:
                content.append(buf[:start].rstrip())
                buf = buf[start + len(QWEN_OPEN) :]
                self._inside = True
                continue
            # Hold what may begin a tag, and trailing whitespace (a tag may follow it).
            keep = _held_prefix(buf, QWEN_OPEN)
            shown = buf[: len(buf) - keep]
            stripped = shown.rstrip()
            content.append(stripped)
            self._held = buf[len(stripped) :]
            break
        return Parsed("".join(content), tuple(calls))

    def finish(self) -> Parsed:
        held, self._held = self._held, ""
        if self._inside:  # cut inside a call (max_tokens): show what was written
            self._inside = False
            return Parsed(QWEN_OPEN + held)
        return Parsed("" if self._after_call else held)


def _decode_call(body: str) -> ToolCall | None:
    try:
        return as_call(json.loads(body))
    except (ValueError, RecursionError):
        return None


def json_value_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array opening at ``text[start]``, or ``None``
    while it is not closed yet (brackets inside strings do not count)."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class LlamaToolCallParser:
    """Llama 3.x JSON calls. The reply is calls only when it opens with ``{`` or ``[`` (after
    whitespace and ``<|python_tag|>``); until that is known it is held back. Each complete
    call is emitted as it closes; from the first JSON value that is not a call (or any other
    text after the calls) on, the rest is content."""

    def __init__(self) -> None:
        self._held = ""
        self._mode = "start"  # "start" (unknown yet), "calls" or "content"

    def feed(self, text: str) -> Parsed:
        buf = self._held + text
        self._held = ""
        if self._mode == "start":
            head = buf.lstrip()
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :].lstrip()
            if not head or PYTHON_TAG.startswith(head):
                self._held = buf
                return Parsed()
            if head[0] in "{[":
                self._mode = "calls"
                buf = head
            else:
                self._mode = "content"
        if self._mode == "content":
            return Parsed(buf)
        return self._calls(buf)

    def _calls(self, buf: str) -> Parsed:
        calls: list[ToolCall] = []
        pos = 0
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ";"):
                pos += 1
            if pos == len(buf):
                return Parsed("", tuple(calls))
            if buf[pos] not in "{[":
                break
            end = json_value_end(buf, pos)
            if end is None:
                self._held = buf[pos:]
                return Parsed("", tuple(calls))
            found = _decode_calls(buf[pos:end])
            if found is None:
                break
            calls.extend(found)
            pos = end
        self._mode = "content"
        return Parsed(buf[pos:], tuple(calls))

    def finish(self) -> Parsed:
        held, self._held = self._held, ""
        return Parsed(held)  # an unclosed call, or whitespace before anything: as written


def _decode_calls(text: str) -> list[ToolCall] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = [as_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parser_for(template: str | None, model_type: str) -> type[ToolCallParser]:
    """The parser for a model's calls: Qwen's tags when its template writes them, Llama's
    JSON for Llama templates and architectures, Qwen's tags otherwise (the most common
    convention, and text without the tag is never touched)."""
    template = template or ""
    if QWEN_OPEN in template:
        return QwenToolCallParser
    if PYTHON_TAG in template or model_type.startswith("llama") or "<|eom_id|>" in template:
        return LlamaToolCallParser
    return QwenToolCallParser


def parse_all(parser: ToolCallParser, text: str) -> Parsed:
    """A whole reply at once (non-streaming)."""
    first, last = parser.feed(text), parser.finish()
    return Parsed(first.content + last.content, first.calls + last.calls)


def template_fields(role: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A message's fields past role and content, as HF templates read them: ``tool_calls``
    with mapping arguments, and a tool result's function ``name`` (Ollama calls it
    ``tool_name``; OpenAI's ``tool_call_id`` passes as is)."""
    out = dict(extra)
    if "tool_calls" in out:
        out["tool_calls"] = template_tool_calls(out["tool_calls"])
    if role == "tool" and "name" not in out and isinstance(out.get("tool_name"), str):
        out["name"] = out["tool_name"]
    return out


def template_tool_calls(calls: Any) -> Any:
    """An assistant message's ``tool_calls`` as HF templates expect them: each call's
    ``function.arguments`` a mapping (OpenAI sends a JSON string; one that is not a JSON
    object is kept as the string). Anything that is not a list of calls is left alone."""
    if not isinstance(calls, list):
        return calls
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                decoded = json.loads(function["arguments"])
            except (ValueError, RecursionError):
                decoded = None
            if isinstance(decoded, dict):
                call = {**call, "function": {**function, "arguments": decoded}}
        out.append(call)
    return out
