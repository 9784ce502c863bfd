"""Honest endings on the wire: work cut short or never admitted is never reported as success.

With the scripted fake runner (Quart's test client): a cut generation (``GenerationCut``), or
a channel that just ends (the tree stopped), answers 503 with ``Retry-After`` and a JSON body
when not streaming, and ends a stream with an error record in each wire format. Over the real
tree and a real socket: the issue's case, a non-streaming OpenAI completion cut by the end of
the grace period, and a stream cut the same way. Too many open generations get 503 at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from actors.messages import GenerateRequest, GenerationCut, OverloadedError
from actors.testing import open_test_runner, tiny_tokenizer
from actors.tree import drain
from api.app import ApiConfig, context_of, create_app
from api.generation import open_generation
from tests.api_fakes import CUT_MESSAGE, FakeRunner, raw_request, serve_app, slow_engine
from tests.waits import read_until, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "native": ("/completion", {"prompt": "hi"}),
    "ollama generate": ("/api/generate", {"model": "fake", "prompt": "hi"}),
    "ollama chat": ("/api/chat", {"model": "fake", "messages": MESSAGES}),
    "openai completions": ("/v1/completions", {"model": "fake", "prompt": "hi"}),
    "openai chat": ("/v1/chat/completions", {"model": "fake", "messages": MESSAGES}),
}


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner(script=("Hello", " world", "!", " more"))


@pytest.fixture
async def client(fake: FakeRunner) -> AsyncIterator[Any]:
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        yield test_app.test_client()


def _cut(fake: FakeRunner, ending: str) -> None:
    if ending == "cut":
        fake.cut_at = 2
    else:
        fake.vanish_at = 2


def _ndjson(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line]


def _sse(data: bytes) -> list[Any]:
    events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("ending", ["cut", "tree stopped"])
@pytest.mark.parametrize("route", ROUTES)
async def test_a_cut_whole_reply_is_503_with_retry_after(client, fake, ending, route) -> None:
    _cut(fake, ending)
    path, body = ROUTES[route]
    response = await client.post(path, json={**body, "stream": False})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    error = (await response.get_json())["error"]
    assert error == CUT_MESSAGE if ending == "cut" else "stopped before the generation" in error
    assert fake.active == 0


@pytest.mark.parametrize("ending", ["cut", "tree stopped"])
async def test_a_cut_native_stream_ends_with_done_reason_2_and_an_error(
    client, fake, ending
) -> None:
    _cut(fake, ending)
    lines = _ndjson(await (await client.post("/completion", json={"prompt": "hi"})).get_data())
    assert [line["content"] for line in lines[:2]] == ["Hello", " world"]  # what was made
    last = lines[-1]
    assert last["done"] is True
    assert last["done_reason"] == 2
    assert "error" in last
    assert [line for line in lines if line["done"]] == [last]
    if ending == "cut":
        assert last["error"] == CUT_MESSAGE
        assert last["eval_count"] == 2


@pytest.mark.parametrize("ending", ["cut", "tree stopped"])
@pytest.mark.parametrize("route", ["ollama generate", "ollama chat"])
async def test_a_cut_ollama_stream_ends_with_an_error_line(client, fake, ending, route) -> None:
    _cut(fake, ending)
    path, body = ROUTES[route]
    lines = _ndjson(await (await client.post(path, json=body)).get_data())
    assert len(lines) == 3
    assert not any(line.get("done") for line in lines)  # no done line: it did not finish
    assert set(lines[-1]) == {"error"}


@pytest.mark.parametrize("ending", ["cut", "tree stopped"])
@pytest.mark.parametrize("route", ["openai completions", "openai chat"])
async def test_a_cut_openai_stream_ends_with_an_error_event(client, fake, ending, route) -> None:
    _cut(fake, ending)
    path, body = ROUTES[route]
    response = await client.post(path, json={**body, "stream": True})
    events = _sse(await response.get_data())
    error = events[-1]["error"]
    assert error["code"] == 503
    assert error["type"] == "server_unavailable"
    assert "[DONE]" not in events
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
    assert set(finishes) == {None}  # no "stop": it did not finish


async def test_too_many_open_generations_answer_503_at_once(client, fake) -> None:
    fake.entry_error = OverloadedError("too many generations are open (256)")
    for path, body in ROUTES.values():
        for stream in (False, True):
            response = await client.post(path, json={**body, "stream": stream})
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert "too many generations" in (await response.get_json())["error"]


async def test_a_reader_over_a_stopped_tree_never_reports_success() -> None:
    fake = FakeRunner(vanish_at=0)
    app = create_app(fake, ApiConfig(model_name="fake"))
    reader = await open_generation(context_of(app), GenerateRequest(prompt="x"))
    with pytest.raises(GenerationCut, match="stopped before the generation finished"):
        await reader.collect()
    assert context_of(app).metrics.value("mlxrunner_cancellations_total") == 1


# ---- over the real tree and a socket ----


@pytest.fixture
async def tree() -> AsyncIterator[tuple[Any, str, int]]:
    async with open_test_runner(slow_engine(0.002), tokenizer=tiny_tokenizer()) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        async with serve_app(app) as (host, port):
            yield harness, host, port


@pytest.mark.parametrize("route", ["openai completions", "openai chat", "ollama generate"])
async def test_a_whole_reply_cut_by_the_grace_period_is_503(tree, route) -> None:
    harness, host, port = tree
    path, body = ROUTES[route]
    body = {**body, "stream": False, "max_tokens": 100_000, "options": {"num_predict": 100_000}}
    stream = await raw_request(host, port, "POST", path, body)
    await wait_until(lambda: harness.statistics().generated_tokens_total >= 2)
    await drain(harness.runner, 0.0)  # the grace period is over: the rest is cut
    answer = await read_until(stream, b"}", eof_ok=True)
    await stream.aclose()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after: 30" in head.lower()
    assert "cut short" in json.loads(payload)["error"]
    assert b"finish_reason" not in answer


async def test_a_stream_cut_by_the_grace_period_ends_with_an_error_event(tree) -> None:
    harness, host, port = tree
    path, body = ROUTES["openai chat"]
    stream = await raw_request(host, port, "POST", path, {**body, "stream": True})
    received = await read_until(stream, lambda r: r.count(b"data: ") >= 3)
    with trio.fail_after(10):  # hang guard
        await drain(harness.runner, 0.0)
    received += await read_until(stream, b"0\r\n\r\n", eof_ok=True)
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200")
    assert b'data: {"error":{"message":"the server is shutting down' in received
    assert b'"finish_reason":"stop"' not in received
    assert b"[DONE]" not in received
