"""Thinking models over HTTP with the official clients: a tiny scripted model whose chat
template reads ``enable_thinking`` (as Qwen3's does) answers with a ``<think>`` block, which
comes back as Ollama's ``thinking`` and OpenAI-style ``reasoning_content``; ``think: false``
reaches the template; a model without thinking gets a 400 for ``think: true``."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import ollama
import openai
import pytest
import trio

from actors.config import Loaded
from actors.messages import ChatMessage, GenerateRequest, GenerationOptions
from actors.testing import ScriptedEngine, fake_info, open_test_runner
from api.app import ApiConfig, create_app
from runtime.engine.protocol import SequenceRequest
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.tokenizer import Tokenizer
from tests.api_fakes import serve_app

# Qwen3's shape: with enable_thinking false the template writes an empty block itself.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
THOUGHT = "The user greets me. I will greet back."
ANSWER = "Hello there! STOP never shown"


@functools.cache
def tokenizer(template: str | None) -> Tokenizer:
    return Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=template))


def model_script(tok: Tokenizer) -> Callable[[SequenceRequest], list[int]]:
    """A model that thinks unless the prompt closed the block already (``think: false``)."""

    def script(request: SequenceRequest) -> list[int]:
        if "</think>" in tok.decode(list(request.prompt)):
            text = ANSWER
        else:
            text = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
        return [*tok.encode(text), min(tok.eos_ids)]

    return script


@asynccontextmanager
async def served(template: str | None) -> AsyncIterator[tuple[ScriptedEngine, str]]:
    tok = tokenizer(template)
    engine = ScriptedEngine(model_script(tok), eos=min(tok.eos_ids))

    def load(progress: Callable[[float], None]) -> Loaded:
        info = attrs.evolve(fake_info(), chat_template=tok.chat_template)
        return Loaded(engine=engine, tokenizer=tok, info=info)

    async with open_test_runner(engine, load=load) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        async with serve_app(app) as (host, port):
            yield engine, f"http://{host}:{port}"


@pytest.fixture
async def thinking() -> AsyncIterator[tuple[ScriptedEngine, str]]:
    async with served(THINKING_TEMPLATE) as server:
        yield server


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


MESSAGES: Any = [{"role": "user", "content": "hi"}]
STOP = {"stop": ["STOP"]}


async def test_ollama_chat_separates_thinking(thinking) -> None:
    engine, url = thinking
    client = ollama.Client(host=url)
    whole = await in_thread(lambda: client.chat(model="fake", messages=MESSAGES, options=STOP))
    assert whole.message.thinking == THOUGHT
    assert whole.message.content == "Hello there! "  # stop strings apply to the content
    # think not given: the template's default (Qwen3's: thinking on), and split as Ollama does.
    assert "</think>" not in tokenizer(THINKING_TEMPLATE).decode(list(engine.last_request.prompt))

    def stream() -> list[Any]:
        return list(
            client.chat(model="fake", messages=MESSAGES, think=True, stream=True, options=STOP)
        )

    parts = await in_thread(stream)
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == "Hello there! "
    assert sum(1 for p in parts if p.message.thinking) > 1  # streamed as it came
    assert parts[-1].done_reason == "stop"


async def test_ollama_generate_separates_thinking(thinking) -> None:
    _, url = thinking
    client = ollama.Client(host=url)
    whole = await in_thread(lambda: client.generate(model="fake", prompt="hi", options=STOP))
    assert whole.thinking == THOUGHT
    assert whole.response == "Hello there! "
    parts = await in_thread(
        lambda: list(client.generate(model="fake", prompt="hi", stream=True, think=True))
    )
    assert "".join(p.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.response for p in parts) == ANSWER


async def test_think_false_reaches_the_template(thinking) -> None:
    engine, url = thinking
    client = ollama.Client(host=url)
    whole = await in_thread(lambda: client.chat(model="fake", messages=MESSAGES, think=False))
    prompt = tokenizer(THINKING_TEMPLATE).decode(list(engine.last_request.prompt))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not whole.message.thinking
    assert whole.message.content == ANSWER


async def test_openai_chat_reasoning_content(thinking) -> None:
    _, url = thinking
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    whole = await in_thread(
        lambda: client.chat.completions.create(model="fake", messages=MESSAGES, stop=["STOP"])
    )
    message = whole.choices[0].message
    assert message.content == "Hello there! "
    assert message.model_extra["reasoning_content"] == THOUGHT

    def stream() -> list[Any]:
        return list(client.chat.completions.create(model="fake", messages=MESSAGES, stream=True))

    deltas = [c.choices[0].delta for c in await in_thread(stream) if c.choices]
    reasoning = [(d.model_extra or {}).get("reasoning_content") or "" for d in deltas]
    assert "".join(reasoning) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER


async def test_thinking_capability_is_shown(thinking) -> None:
    _, url = thinking
    shown = await in_thread(lambda: ollama.Client(host=url).show("fake"))
    assert "thinking" in shown.capabilities


async def test_model_without_thinking_refuses_think_true() -> None:
    async with served(None) as (_, url):
        client = ollama.Client(host=url)
        with pytest.raises(ollama.ResponseError) as refused:
            await in_thread(lambda: client.chat(model="fake", messages=MESSAGES, think=True))
        assert refused.value.status_code == 400
        assert "does not support thinking" in refused.value.error
        # think: false is fine, and the <think> text of a model that cannot think is content.
        whole = await in_thread(lambda: client.chat(model="fake", messages=MESSAGES, think=False))
        assert whole.message.content.startswith("<think>")
        assert not whole.message.thinking
        shown = await in_thread(lambda: client.show("fake"))
        assert "thinking" not in shown.capabilities


async def test_stop_strings_apply_to_the_content_only() -> None:
    tok = tokenizer(THINKING_TEMPLATE)
    engine = ScriptedEngine(model_script(tok), eos=min(tok.eos_ids))
    request = GenerateRequest(
        messages=(ChatMessage(role="user", content="hi"),),
        separate_thinking=True,
        options=GenerationOptions(stop=("greet", "STOP")),  # "greet" is in the thinking only
    )
    async with open_test_runner(engine, tokenizer=tok) as harness:
        chunks = await harness.generate(request)
    assert "".join(c.thinking for c in chunks) == THOUGHT
    assert "".join(c.content for c in chunks) == "Hello there! "


async def test_a_prompt_that_opens_the_block_starts_in_thinking() -> None:
    # DeepSeek R1's shape: the template opens <think>, the model writes only its end.
    tok = tokenizer(THINKING_TEMPLATE + "{{ '<think>\\n' }}")
    script = [*tok.encode(f"{THOUGHT}\n</think>\n\n{ANSWER}"), min(tok.eos_ids)]
    engine = ScriptedEngine(lambda r: script, eos=min(tok.eos_ids))
    request = GenerateRequest(
        messages=(ChatMessage(role="user", content="hi"),), separate_thinking=True
    )
    async with open_test_runner(engine, tokenizer=tok) as harness:
        chunks = await harness.generate(request)
    assert "".join(c.thinking for c in chunks) == THOUGHT
    assert "".join(c.content for c in chunks) == ANSWER
