"""The official ``ollama`` and ``openai`` Python clients, unchanged, against a served app.

They are synchronous, so each call runs in a worker thread while hypercorn serves here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import ollama
import openai
import pytest
import trio

from api.app import ApiConfig, create_app
from tests.api_fakes import FakeRunner, serve_app


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeRunner, str]]:
    fake = FakeRunner()
    app = create_app(fake, ApiConfig(model_name="fake:latest", api_key=None))
    async with serve_app(app) as (host, port):
        yield fake, f"http://{host}:{port}"


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ---- ollama ----


async def test_ollama_generate(server) -> None:
    fake, url = server
    client = ollama.Client(host=url)
    result = await in_thread(lambda: client.generate(model="fake", prompt="hi"))
    assert result.response == "Hello world!"
    assert result.done is True
    assert result.done_reason == "stop"
    assert result.eval_count == 3
    assert result.prompt_eval_count == 5
    assert fake.requests[0].template is True

    def stream() -> list[Any]:
        return list(client.generate(model="fake", prompt="hi", stream=True, options={"seed": 3}))

    parts = await in_thread(stream)
    assert "".join(p.response for p in parts) == "Hello world!"
    assert parts[-1].done
    assert parts[-1].eval_duration == 6000
    assert fake.requests[1].options.sampling.seed == 3


async def test_ollama_chat_streaming_and_not(server) -> None:
    fake, url = server
    client = ollama.Client(host=url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    result = await in_thread(lambda: client.chat(model="fake:latest", messages=messages))
    assert result.message.role == "assistant"
    assert result.message.content == "Hello world!"
    assert result.done_reason == "stop"
    assert [m.role for m in fake.requests[0].messages] == ["system", "user"]

    def stream() -> list[Any]:
        return list(client.chat(model="fake", messages=messages, stream=True))

    parts = await in_thread(stream)
    assert "".join(p.message.content for p in parts) == "Hello world!"
    assert parts[-1].done


async def test_ollama_list_show_ps_version(server) -> None:
    _, url = server
    client = ollama.Client(host=url)
    listed = await in_thread(client.list)
    assert [m.model for m in listed.models] == ["fake:latest"]
    assert listed.models[0].details.quantization_level == "Q4_1"
    shown = await in_thread(lambda: client.show("fake"))
    assert "tools" not in shown.capabilities  # its template does not render tools
    assert shown.details.family == "llama"
    assert shown.modelinfo["llama.context_length"] == 64
    running = await in_thread(client.ps)
    assert running.models[0].context_length == 64


async def test_ollama_errors_raise_response_error(server) -> None:
    _, url = server
    client = ollama.Client(host=url)
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(lambda: client.generate(model="missing", prompt="hi"))
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(lambda: client.chat(model="fake", messages=[{"role": "wizard"}]))
    assert info.value.status_code == 400


# ---- openai ----


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def test_openai_chat_completion(server) -> None:
    fake, url = server
    client = openai_client(url)
    result = await in_thread(
        lambda: client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            temperature=0.5,
            stop=["zz"],
            seed=1,
        )
    )
    assert result.choices[0].message.content == "Hello world"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 2
    options = fake.requests[0].options
    assert options.num_predict == 2
    assert options.sampling.temperature == 0.5
    assert options.stop == ("zz",)


async def test_openai_chat_streaming_with_usage_and_logprobs(server) -> None:
    _, url = server
    client = openai_client(url)

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
                logprobs=True,
                top_logprobs=2,
            )
        )

    chunks = await in_thread(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 8
    with_logprobs = [c for c in chunks if c.choices and c.choices[0].logprobs]
    first = with_logprobs[0].choices[0].logprobs.content[0]
    assert first.token == "Hello"
    assert len(first.top_logprobs) == 2


async def test_openai_completions_streaming_and_not(server) -> None:
    _, url = server
    client = openai_client(url)
    result = await in_thread(
        lambda: client.completions.create(model="fake", prompt="hi", logprobs=1)
    )
    assert result.choices[0].text == "Hello world!"
    assert result.choices[0].logprobs.tokens == ["Hello", " world", "!"]
    assert result.choices[0].logprobs.text_offset == [0, 5, 11]

    def stream() -> list[Any]:
        return list(client.completions.create(model="fake", prompt="hi", stream=True))

    chunks = await in_thread(stream)
    assert "".join(c.choices[0].text for c in chunks) == "Hello world!"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_models_and_errors(server) -> None:
    _, url = server
    client = openai_client(url)
    models = await in_thread(client.models.list)
    assert [m.id for m in models.data] == ["fake:latest"]
    with pytest.raises(openai.NotFoundError):
        await in_thread(
            lambda: client.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "hi"}]
            )
        )
    with pytest.raises(openai.BadRequestError):
        await in_thread(
            lambda: client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], temperature=3
            )
        )
