"""Tool calls on the wire: a chat's chunks run through the model's call parser, and the calls
in Ollama's and OpenAI's shapes.

Only a request that sends ``tools`` has its output parsed (as Ollama does): without tools the
chunks pass unchanged. The parser (``runtime/text/tool_calls.py``) follows the served model's
chat template and architecture. OpenAI's ``tool_choice`` "required" or a named function
forces a call: the reply is constrained to that call format (structured output).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from actors.messages import Chunk, DoneReason, GenerateRequest, UnavailableError
from api import fields
from api.context import ApiContext
from api.errors import bad_request
from runtime.text.structured import OutputFormat, tool_call_format
from runtime.text.tool_calls import (
    LlamaToolCallParser,
    Parsed,
    ToolCall,
    ToolCallParser,
    parse_all,
    parser_for,
)

Tools = tuple[Mapping[str, Any], ...] | None


# OpenAI's tool_choice: "auto" (the default), "none" (no tools reach the model), "required"
# (the reply is a call of one of the tools) or a named function (a call of that one). A call is
# forced by constraining the reply to the model's call format (``tool_call_format``).
TOOL_CHOICE = fields.raw(
    "tool_choice",
    {
        "oneOf": [
            {"enum": ["auto", "none", "required", None]},
            {
                "type": "object",
                "properties": {
                    "type": {"enum": ["function"]},
                    "function": {"type": "object", "properties": {"name": {"type": "string"}}},
                },
                "required": ["function"],
            },
        ]
    },
    description="'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}: "
    "the last two force a call (the reply is constrained to the model's call format)",
)


def _tool_name(tool: Mapping[str, Any]) -> Any:
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else None


def chosen_tools(
    ctx: ApiContext, body: fields.DeclaredBody, tools: Tools
) -> tuple[Tools, OutputFormat | None]:
    """The tools a request offers the model, after ``tool_choice``, and the format that forces
    a call when it asks for one."""
    choice = TOOL_CHOICE.read(body)
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        callable_ = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        callable_ = tuple(t for t in tools or () if _tool_name(t) == name) or None
        if tools and callable_ is None:
            raise bad_request(
                f"'tool_choice' names {json.dumps(name)[:80]}, which is not in 'tools'"
            )
    else:
        raise bad_request(
            f"'tool_choice' {json.dumps(choice)[:80]} is not one of 'auto', 'none', 'required' "
            "or {'type': 'function', 'function': {'name': ...}}"
        )
    if not callable_:
        raise bad_request("'tool_choice' forces a call, but 'tools' is empty")
    parser = parser_for(ctx.model_info().chat_template, ctx.model_info().model_type)
    style: Literal["qwen", "llama"] = "llama" if parser is LlamaToolCallParser else "qwen"
    return tools, tool_call_format(callable_, style=style)


def _parser(ctx: ApiContext, req: GenerateRequest) -> ToolCallParser | None:
    if not req.tools:
        return None
    try:
        info = ctx.model_info()
    except UnavailableError:  # stopping after admission: the generation ends anyway
        return parser_for(None, "")()
    return parser_for(info.chat_template, info.model_type)()


class ToolCallStream:
    """One chat's output, chunk by chunk: content with call markup taken out, and the calls
    each chunk completed. ``count`` is how many calls came so far (their wire indices)."""

    def __init__(self, ctx: ApiContext, req: GenerateRequest) -> None:
        self._parser = _parser(ctx, req)
        self.count = 0

    def chunk(self, chunk: Chunk) -> tuple[Chunk, tuple[ToolCall, ...]]:
        """``chunk`` with its shown content, and the calls it completed; the last chunk also
        carries whatever was held back."""
        if self._parser is None:
            return chunk, ()
        parsed = self._parser.feed(chunk.content)
        if chunk.done:
            tail = self._parser.finish()
            parsed = Parsed(parsed.content + tail.content, parsed.calls + tail.calls)
        self.count += len(parsed.calls)
        return attrs.evolve(chunk, content=parsed.content), parsed.calls

    def whole(self, chunk: Chunk) -> tuple[Chunk, tuple[ToolCall, ...]]:
        """A collected reply's content and calls."""
        if self._parser is None:
            return chunk, ()
        parsed = parse_all(self._parser, chunk.content)
        self.count = len(parsed.calls)
        return attrs.evolve(chunk, content=parsed.content), parsed.calls


def ollama_tool_calls(calls: tuple[ToolCall, ...], first: int) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls``: arguments as an object, ``index`` in the reply."""
    return [
        {"function": {"index": first + i, "name": c.name, "arguments": dict(c.arguments)}}
        for i, c in enumerate(calls)
    ]


def openai_tool_calls(
    calls: tuple[ToolCall, ...], first: int, *, delta: bool
) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls``: a fresh ``call_`` id, arguments as a JSON string; stream
    deltas also carry the call's ``index`` (each call comes whole, in one delta)."""
    out = []
    for i, call in enumerate(calls):
        entry: dict[str, Any] = {"index": first + i} if delta else {}
        entry.update(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": json.dumps(dict(call.arguments), ensure_ascii=False),
                },
            }
        )
        out.append(entry)
    return out


def openai_finish(reason: str, chunk: Chunk, any_calls: bool) -> str:
    """``tool_calls`` when the model stopped after calling tools; otherwise ``reason``."""
    stopped = chunk.done_reason in (None, DoneReason.STOP)
    return "tool_calls" if any_calls and stopped else reason
