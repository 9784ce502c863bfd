"""The HTTP layer over the real actor tree (``actors.testing``: scripted engine, tiny
tokenizer): disconnects free the scheduler's sequence, errors keep their statuses, and the
official clients work end to end."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import ollama
import openai
import pytest
import trio

from actors.testing import HarnessClient, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from tests.api_fakes import raw_request, serve_app, slow_engine
from tests.waits import read_until, wait_until


@functools.cache
def tokenizer() -> Any:
    return tiny_tokenizer()  # trained in-process: once per test session is enough


@pytest.fixture
async def tree() -> AsyncIterator[tuple[HarnessClient, str, int]]:
    engine = slow_engine(0.002)
    async with open_test_runner(engine, tokenizer=tokenizer(), max_queue=4, parallel=2) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake", max_body=1 << 16))
        async with serve_app(app) as (host, port):
            yield harness, host, port


async def assert_sequence_gone(harness: HarnessClient) -> None:
    await wait_until(lambda: harness.statistics().active_sequences == 0)
    assert harness.statistics().cancelled_total == 1
    assert harness.engine.removed  # the scheduler told the engine to drop it...
    assert not harness.engine.seqs  # ...so no step has anything left to compute


async def test_stream_disconnect_frees_the_sequence_in_the_tree(tree) -> None:
    harness, host, port = tree
    stream = await raw_request(host, port, "POST", "/completion", {"prompt": "hello"})
    await read_until(stream, lambda r: r.count(b'"done":false') >= 2)
    assert harness.statistics().active_sequences == 1
    await stream.aclose()
    await assert_sequence_gone(harness)


async def test_non_streaming_disconnect_frees_the_sequence_in_the_tree(tree) -> None:
    harness, host, port = tree
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    stream = await raw_request(host, port, "POST", "/api/chat", body)
    await wait_until(lambda: harness.statistics().generated_tokens_total >= 2)
    await stream.aclose()
    await assert_sequence_gone(harness)


async def test_runner_errors_keep_their_statuses(tree) -> None:
    harness, host, port = tree
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0)
    too_long = "hello " * 200  # the scripted engine's context here is 100k tokens: use num_ctx

    def over_context() -> Any:
        return client.completions.create(
            model="fake", prompt=too_long, extra_body={"num_ctx": 16}, max_tokens=1
        )

    with pytest.raises(openai.APIStatusError) as info:
        await trio.to_thread.run_sync(over_context)
    assert info.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        await trio.to_thread.run_sync(
            lambda: client.completions.create(model="fake", prompt=[10**6], max_tokens=1)
        )
    assert harness.statistics().active_sequences == 0


async def test_official_clients_over_the_tree(tree) -> None:
    harness, host, port = tree
    url = f"http://{host}:{port}"
    chat = ollama.Client(host=url)
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    result = await trio.to_thread.run_sync(
        lambda: chat.chat(model="fake", messages=messages, options={"num_predict": 5})
    )
    assert result.done_reason == "length"
    assert result.eval_count == 5
    parts = await trio.to_thread.run_sync(
        lambda: list(
            chat.generate(model="fake", prompt="hi", stream=True, options={"num_predict": 3})
        )
    )
    assert parts[-1].done
    assert parts[-1].eval_count == 3

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

    def stream() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="fake",
                messages=messages,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    chunks = await trio.to_thread.run_sync(stream)
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert harness.statistics().requests_total == 3


async def test_a_full_queue_answers_429_with_retry_after() -> None:
    engine = slow_engine(0.002)
    async with open_test_runner(engine, tokenizer=tokenizer(), max_queue=1, parallel=1) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        async with serve_app(app) as (host, port):
            running = await raw_request(host, port, "POST", "/completion", {"prompt": "a"})
            await wait_until(lambda: harness.statistics().active_sequences == 1)
            waiting = await raw_request(host, port, "POST", "/completion", {"prompt": "b"})
            await wait_until(lambda: harness.statistics().queued_requests == 1)
            refused = await raw_request(host, port, "POST", "/completion", {"prompt": "c"})
            answer = await read_until(refused, lambda r: b"}" in r)
            assert answer.startswith(b"HTTP/1.1 429")
            assert b"retry-after: 1" in answer.lower()
            for stream in (refused, waiting, running):
                await stream.aclose()
            await wait_until(lambda: harness.statistics().active_sequences == 0)
            assert harness.statistics().queued_requests == 0
