"""Tool-call parsing (runtime/text/tool_calls.py): Qwen's tags and Llama's JSON, fed whole,
split at every boundary and character by character, with no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.text.tool_calls import (
    LlamaToolCallParser,
    Parsed,
    QwenToolCallParser,
    ToolCall,
    ToolCallParser,
    parse_all,
    parser_for,
    template_tool_calls,
)

WEATHER = ToolCall("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ToolCall("get_time", {"zone": "CET"})


def qwen_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": dict(call.arguments)})
    return f"<tool_call>\n{body}\n</tool_call>"


def llama_call(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "parameters": dict(call.arguments)})


def feed_pieces(parser: ToolCallParser, pieces: list[str]) -> Parsed:
    content: list[str] = []
    calls: list[ToolCall] = []
    for piece in [*pieces, None]:
        got = parser.feed(piece) if piece is not None else parser.finish()
        content.append(got.content)
        calls.extend(got.calls)
    return Parsed("".join(content), tuple(calls))


def every_split(make: type[ToolCallParser], text: str) -> list[Parsed]:
    """The result of feeding ``text`` in two pieces split at each index, and char by char."""
    results = [feed_pieces(make(), [text[:i], text[i:]]) for i in range(len(text) + 1)]
    results.append(feed_pieces(make(), list(text)))
    return results


QWEN_CASES: list[tuple[str, Parsed]] = [
    ("Hello world!", Parsed("Hello world!")),
    (qwen_call(WEATHER), Parsed("", (WEATHER,))),
    (qwen_call(WEATHER) + "\n" + qwen_call(TIME) + "\n", Parsed("", (WEATHER, TIME))),
    ("Let me check.\n\n" + qwen_call(WEATHER), Parsed("Let me check.", (WEATHER,))),
    (qwen_call(TIME) + "\nDone. ", Parsed("Done. ", (TIME,))),
    ("a < b <tool and <tool_calls", Parsed("a < b <tool and <tool_calls")),
    # arguments as a JSON string and a "function" wrapper are accepted too
    (
        '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>',
        Parsed("", (TIME,)),
    ),
    # markup holding no call stays content, verbatim
    ("<tool_call>{not json}</tool_call>", Parsed("<tool_call>{not json}</tool_call>")),
    (
        '<tool_call>{"arguments": {}}</tool_call>',
        Parsed('<tool_call>{"arguments": {}}</tool_call>'),
    ),
    # cut inside a call (max_tokens): what was written is content
    ('ok <tool_call>{"name": "get_', Parsed('ok<tool_call>{"name": "get_')),
]


@pytest.mark.parametrize(("text", "expected"), QWEN_CASES)
def test_qwen_calls_at_every_boundary(text: str, expected: Parsed) -> None:
    assert parse_all(QwenToolCallParser(), text) == expected
    for result in every_split(QwenToolCallParser, text):
        assert result == expected


def test_qwen_holds_back_a_partial_tag_until_it_is_known() -> None:
    parser = QwenToolCallParser()
    assert parser.feed("Sure <tool") == Parsed("Sure")
    assert parser.feed('_call>{"name": "get_time", ') == Parsed()
    assert parser.feed('"arguments": {"zone": "CET"}}</tool_call>') == Parsed("", (TIME,))
    assert parser.feed("\n<tool_c") == Parsed()
    assert parser.feed("ake> is not a tag") == Parsed("<tool_cake> is not a tag")
    assert parser.finish() == Parsed()


def test_qwen_emits_each_call_as_it_closes() -> None:
    parser = QwenToolCallParser()
    assert parser.feed(qwen_call(WEATHER) + "\n<tool_call>") == Parsed("", (WEATHER,))
    assert parser.feed(qwen_call(TIME)[len("<tool_call>") :]) == Parsed("", (TIME,))


LLAMA_CASES: list[tuple[str, Parsed]] = [
    ("Hello world!", Parsed("Hello world!")),
    (llama_call(WEATHER), Parsed("", (WEATHER,))),
    ("<|python_tag|>" + llama_call(WEATHER), Parsed("", (WEATHER,))),
    (" \n" + llama_call(WEATHER) + "; " + llama_call(TIME), Parsed("", (WEATHER, TIME))),
    ("[" + llama_call(WEATHER) + ", " + llama_call(TIME) + "]", Parsed("", (WEATHER, TIME))),
    ('{"name": "get_time", "arguments": {"zone": "CET"}}', Parsed("", (TIME,))),
    ('{"name": "x", "parameters": {"s": "}{\\"]"}}', Parsed("", (ToolCall("x", {"s": '}{"]'}),))),
    # JSON that is not a call, and text after the calls, stay content
    ('{"answer": 42}', Parsed('{"answer": 42}')),
    (llama_call(TIME) + " then prose", Parsed("then prose", (TIME,))),
    ("{broken", Parsed("{broken")),
    ("{not json}", Parsed("{not json}")),
    ("<|python", Parsed("<|python")),
]


@pytest.mark.parametrize(("text", "expected"), LLAMA_CASES)
def test_llama_calls_at_every_boundary(text: str, expected: Parsed) -> None:
    assert parse_all(LlamaToolCallParser(), text) == expected
    for result in every_split(LlamaToolCallParser, text):
        assert result == expected


def test_llama_emits_each_call_as_it_closes() -> None:
    parser = LlamaToolCallParser()
    assert parser.feed(llama_call(WEATHER)[:-3]) == Parsed()
    assert parser.feed(llama_call(WEATHER)[-3:] + "; {") == Parsed("", (WEATHER,))
    assert parser.feed(llama_call(TIME)[1:]) == Parsed("", (TIME,))
    assert parser.finish() == Parsed()


@pytest.mark.parametrize(
    ("template", "model_type", "expected"),
    [
        ("{% for t in tools %}<tool_call>{% endfor %}", "qwen2", QwenToolCallParser),
        ("{{ '<|python_tag|>' }}", "unknown", LlamaToolCallParser),
        ("{{ messages }}", "llama", LlamaToolCallParser),
        (None, "qwen3", QwenToolCallParser),
    ],
)
def test_the_parser_follows_the_template_then_the_architecture(
    template: str | None, model_type: str, expected: type
) -> None:
    assert parser_for(template, model_type) is expected


def test_openai_string_arguments_become_mappings_for_the_template() -> None:
    calls: list[Any] = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"function": {"name": "g", "arguments": {"b": 2}}},
        {"function": {"name": "h", "arguments": "not json"}},
    ]
    assert template_tool_calls(calls) == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
        {"function": {"name": "g", "arguments": {"b": 2}}},
        {"function": {"name": "h", "arguments": "not json"}},
    ]
    assert template_tool_calls("odd") == "odd"


def test_tool_results_name_their_function_for_the_template() -> None:
    from runtime.text.tool_calls import template_fields

    assert template_fields("tool", {"tool_name": "f"}) == {"tool_name": "f", "name": "f"}
    assert template_fields("tool", {"tool_call_id": "call_1", "name": "g"}) == {
        "tool_call_id": "call_1",
        "name": "g",
    }
    assert template_fields("user", {"tool_name": "f"}) == {"tool_name": "f"}
