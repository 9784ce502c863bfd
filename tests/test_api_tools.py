"""Tool calls end to end: the official ``openai`` and ``ollama`` clients against the real
server and actor tree, over the tiny tokenizer and a scripted engine whose output is the text
each test sets. Tools are rendered by a small Qwen-style template (or a Llama-style one), the
scripted calls come back as ``tool_calls`` streaming and not, and earlier calls and tool
results reach the template."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import ollama
import openai
import pytest
import trio

from actors.config import Loaded
from actors.testing import ScriptedEngine, fake_info, open_test_runner
from api.app import ApiConfig, create_app
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.tokenizer import Tokenizer
from tests.api_fakes import serve_app

QWEN_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}"
    "Call one with <tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n"
    "<tool_response name={{ m.name }} id={{ m.tool_call_id }}>{{ m.content }}</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3's tool prompt, reduced: no <tool_call> tag, JSON calls.
LLAMA_TEMPLATE = (
    "{% if tools %}Tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: "
)
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK: Any = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
OSLO = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
TWO_CALLS = f"Let me check.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{OSLO}\n</tool_call>"


@functools.cache
def tokenizer(template: str) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=template))


@attrs.define
class Served:
    url: str
    engine: ScriptedEngine
    tok: Tokenizer
    output: str = "Hello"

    def prompt(self) -> str:
        """The text the template rendered for the last request."""
        return self.tok.decode(list(self.engine.last_request.prompt))

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.url)


async def serve(template: str, model_type: str) -> AsyncIterator[Served]:
    tok = tokenizer(template)
    eos = tok.token_to_id("<|im_end|>")
    assert eos is not None
    served: Served

    def script(request: Any) -> list[int]:
        return [*tok.encode(served.output), eos]

    engine = ScriptedEngine(script, context_length=4096, eos=eos)

    def load(progress: Callable[[float], None]) -> Loaded:
        info = attrs.evolve(
            fake_info(context_length=4096), chat_template=template, model_type=model_type
        )
        return Loaded(engine=engine, tokenizer=tok, info=info)

    async with open_test_runner(engine, load=load) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        async with serve_app(app) as (host, port):
            served = Served(f"http://{host}:{port}", engine, tok)
            yield served


@pytest.fixture
async def qwen() -> AsyncIterator[Served]:
    async for served in serve(QWEN_TEMPLATE, "qwen2"):
        yield served


@pytest.fixture
async def llama() -> AsyncIterator[Served]:
    async for served in serve(LLAMA_TEMPLATE, "llama"):
        yield served


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ---- OpenAI ----


async def test_openai_tools_are_rendered_and_calls_come_back(qwen: Served) -> None:
    qwen.output = TWO_CALLS
    client = qwen.openai()
    reply = await in_thread(
        lambda: client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER_TOOL])
    )
    assert json.dumps(WEATHER_TOOL) in qwen.prompt()  # through the template's `tools`
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.type for c in calls] == ["function", "function"]
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert all(c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id

    qwen.output = f"<tool_call>{PARIS}</tool_call>"
    reply = await in_thread(
        lambda: client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER_TOOL])
    )
    assert reply.choices[0].message.content is None  # calls only: null content, as OpenAI


async def test_openai_streams_each_call_as_a_delta(qwen: Served) -> None:
    qwen.output = TWO_CALLS
    client = qwen.openai()

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="fake", messages=ASK, tools=[WEATHER_TOOL], stream=True
            )
        )

    events = await in_thread(stream)
    deltas = [e.choices[0].delta for e in events if e.choices]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me check."  # no markup leaked, even split token by token
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert [c.index for c in calls] == [0, 1]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert {c.function.name for c in calls} == {"get_weather"}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert events[-1].choices[0].finish_reason == "tool_calls"


async def test_openai_calls_and_results_go_back_into_the_template(qwen: Served) -> None:
    qwen.output = "Sunny in Paris."
    client = qwen.openai()
    call = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "name": "get_weather", "content": "18C sun"},
    ]
    reply = await in_thread(
        lambda: client.chat.completions.create(
            model="fake", messages=messages, tools=[WEATHER_TOOL]
        )
    )
    prompt = qwen.prompt()
    # The JSON-string arguments reached the template as an object.
    assert (
        f"<tool_call>{json.dumps({'name': 'get_weather', 'arguments': {'city': 'Paris'}})}"
        in prompt
    )
    assert "<tool_response name=get_weather id=call_7>18C sun</tool_response>" in prompt
    assert reply.choices[0].message.content == "Sunny in Paris."
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


async def test_without_tools_the_markup_is_plain_content(qwen: Served) -> None:
    qwen.output = f"<tool_call>{PARIS}</tool_call>"
    client = qwen.openai()
    reply = await in_thread(lambda: client.chat.completions.create(model="fake", messages=ASK))
    assert reply.choices[0].message.content == qwen.output
    assert reply.choices[0].finish_reason == "stop"


async def test_llama_json_calls_through_openai(llama: Served) -> None:
    llama.output = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    client = llama.openai()
    reply = await in_thread(
        lambda: client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER_TOOL])
    )
    assert "Tools: get_weather" in llama.prompt()
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    assert reply.choices[0].finish_reason == "tool_calls"

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="fake", messages=ASK, tools=[WEATHER_TOOL], stream=True
            )
        )

    deltas = [e.choices[0].delta for e in await in_thread(stream) if e.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.function.name for d in deltas for c in d.tool_calls or []] == ["get_weather"]


# ---- Ollama ----


async def test_ollama_calls_streaming_and_not(qwen: Served) -> None:
    qwen.output = TWO_CALLS
    client = qwen.ollama()
    reply = await in_thread(lambda: client.chat(model="fake", messages=ASK, tools=[WEATHER_TOOL]))
    assert '"description": "The weather in a city now"' in qwen.prompt()
    assert reply.message.content == "Let me check."
    assert [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert reply.done_reason == "stop"  # Ollama keeps "stop" after tool calls

    def stream() -> list[Any]:
        return list(client.chat(model="fake", messages=ASK, tools=[WEATHER_TOOL], stream=True))

    parts = await in_thread(stream)
    assert "".join(p.message.content or "" for p in parts) == "Let me check."
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [dict(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert parts[-1].done
    assert parts[-1].done_reason == "stop"


async def test_ollama_calls_and_results_go_back_into_the_template(qwen: Served) -> None:
    qwen.output = "Cold in Oslo."
    client = qwen.ollama()
    messages: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "-3C", "tool_name": "get_weather"},
    ]
    reply = await in_thread(
        lambda: client.chat(model="fake", messages=messages, tools=[WEATHER_TOOL])
    )
    prompt = qwen.prompt()
    assert (
        f"<tool_call>{json.dumps({'name': 'get_weather', 'arguments': {'city': 'Oslo'}})}" in prompt
    )
    assert "<tool_response name=get_weather id=>-3C</tool_response>" in prompt
    assert reply.message.content == "Cold in Oslo."
    assert not reply.message.tool_calls


async def test_ollama_show_lists_tools_when_the_template_renders_them(qwen: Served) -> None:
    shown = await in_thread(lambda: qwen.ollama().show("fake"))
    assert "tools" in shown.capabilities


async def test_openai_tool_choice_none_offers_no_tools_and_bad_choices_are_refused(
    qwen: Served,
) -> None:
    """(A forced call, "required" or a named function, is tested on a real model in
    test_api_structured.py: this engine is scripted and ignores constraints.)"""
    qwen.output = f"<tool_call>{PARIS}</tool_call>"
    client = qwen.openai()
    reply = await in_thread(
        lambda: client.chat.completions.create(
            model="fake", messages=ASK, tools=[WEATHER_TOOL], tool_choice="none"
        )
    )
    assert "get_weather" not in qwen.prompt()
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == qwen.output
    bad: list[dict[str, Any]] = [
        {"tools": [WEATHER_TOOL], "tool_choice": "sometimes"},
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        {"tool_choice": "required"},
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
    ]
    for extra in bad:

        def create(extra: dict[str, Any] = extra) -> Any:
            return client.chat.completions.create(model="fake", messages=ASK, **extra)

        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(create)
        assert "tool_choice" in refused.value.response.text


@pytest.fixture
async def qwen3() -> AsyncIterator[Served]:
    async for served in serve(QWEN_TEMPLATE + "{# enable_thinking #}", "qwen3"):
        yield served


async def test_a_thinking_model_thinks_then_calls(qwen3: Served) -> None:
    # Qwen3: the <think> block is split out first (the pipeline), the call from what remains.
    qwen3.output = f"<think>Paris first.</think>\n\n<tool_call>\n{PARIS}\n</tool_call>"
    client = qwen3.ollama()
    reply = await in_thread(lambda: client.chat(model="fake", messages=ASK, tools=[WEATHER_TOOL]))
    assert reply.message.thinking == "Paris first."
    assert reply.message.content == ""
    assert [c.function.name for c in reply.message.tool_calls] == ["get_weather"]


async def test_each_of_n_choices_has_its_own_calls(qwen: Served) -> None:
    qwen.output = TWO_CALLS
    client = qwen.openai()
    reply = await in_thread(
        lambda: client.chat.completions.create(
            model="fake", messages=ASK, tools=[WEATHER_TOOL], n=2
        )
    )
    assert [c.finish_reason for c in reply.choices] == ["tool_calls", "tool_calls"]
    assert [len(c.message.tool_calls) for c in reply.choices] == [2, 2]

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="fake", messages=ASK, tools=[WEATHER_TOOL], n=2, stream=True
            )
        )

    events = await in_thread(stream)
    for i in (0, 1):
        deltas = [c.delta for e in events for c in e.choices if c.index == i]
        assert [c.index for d in deltas for c in d.tool_calls or []] == [0, 1]
        assert "".join(d.content or "" for d in deltas) == "Let me check."
