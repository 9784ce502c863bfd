"""Limits every route enforces on what a client sends (stop strings, sampling numbers), and
large bodies and replies made off the event loop. Quart's test client over the scripted fake
runner."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from api import replies, schemas
from api.app import ApiConfig, create_app
from api.schemas import INLINE_BODY_BYTES, MAX_STOP_LENGTH, MAX_STOP_STRINGS
from tests.api_fakes import FakeRunner
from tests.waits import wait_until


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
async def client(fake: FakeRunner) -> AsyncIterator[Any]:
    app = create_app(fake, ApiConfig(model_name="fake:latest", max_body=1 << 22))
    async with app.test_app() as test_app:
        yield test_app.test_client()


def _native(extra: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "hi", "stream": False, "options": extra}


def _ollama_generate(extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake", "prompt": "hi", "stream": False, "options": extra}


def _ollama_chat(extra: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": "fake", "messages": messages, "stream": False, "options": extra}


def _openai_completions(extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake", "prompt": "hi", **extra}


def _openai_chat(extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}


# Each route family and how its body carries options (Ollama's names under "options", or
# OpenAI's at the top level).
ROUTES = [
    ("/completion", _native),
    ("/api/generate", _ollama_generate),
    ("/api/chat", _ollama_chat),
    ("/v1/completions", _openai_completions),
    ("/v1/chat/completions", _openai_chat),
]
ROUTE_IDS = [path for path, _ in ROUTES]


async def _post(client: Any, path: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    return response.status_code, json.loads(await response.get_data())


# ---- stop strings ----


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_stop_strings_are_capped_in_count_and_length(
    client: Any, fake: FakeRunner, path: str, body: Any
) -> None:
    most = [f"{i:03d}" + "x" * (MAX_STOP_LENGTH - 3) for i in range(MAX_STOP_STRINGS)]
    status, _ = await _post(client, path, body({"stop": most}))
    assert status == 200
    assert fake.requests[-1].options.stop == tuple(most)

    status, reply = await _post(client, path, body({"stop": [*most, "one more"]}))
    assert status == 400
    assert f"at most {MAX_STOP_STRINGS}" in reply["error"]

    status, reply = await _post(client, path, body({"stop": ["y" * (MAX_STOP_LENGTH + 1)]}))
    assert status == 400
    assert f"longer than {MAX_STOP_LENGTH} characters" in reply["error"]
    assert len(fake.requests) == 1


async def test_two_hundred_thousand_stop_strings_are_refused(client: Any, fake: FakeRunner) -> None:
    status, reply = await _post(
        client, "/v1/completions", _openai_completions({"stop": ["s"] * 200_000})
    )
    assert status == 400
    assert "200000 strings" in reply["error"]
    assert fake.requests == []


# ---- sampling numbers ----


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    ("option", "raw", "message"),
    [
        ("temperature", "1e400", "temperature"),  # a JSON number Python reads as infinity
        ("temperature", "NaN", "invalid JSON"),
        ("repeat_penalty", "0.001", "repeat_penalty must be >= 0.01"),
        ("repeat_penalty", "-1e400", "repeat_penalty"),
        ("presence_penalty", "1e400", "presence_penalty"),
        ("frequency_penalty", "-Infinity", "invalid JSON"),
        ("top_p", "1e400", "top_p"),
    ],
)
async def test_no_route_takes_a_number_the_sampler_cannot_use(
    client: Any, fake: FakeRunner, path: str, body: Any, option: str, raw: str, message: str
) -> None:
    # JSON can spell numbers json.dumps never writes: put the raw literal in by hand.
    data = json.dumps(body({option: "@"})).replace('"@"', raw).encode()
    status, reply = await _post(client, path, data)
    assert status == 400, reply
    assert message in reply["error"]
    assert fake.requests == []


# ---- large bodies ----


async def test_a_large_body_is_decoded_and_parsed_off_the_loop(
    client: Any, fake: FakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, entered = threading.Event(), threading.Event()
    loop = threading.get_ident()
    ran: list[tuple[str, bool, bool]] = []  # (step, for the large body, on the loop's thread)
    decode, parse_messages = schemas.decode_json, schemas.chat_messages

    def gated_decode(data: bytes) -> dict[str, Any]:
        ran.append(("decode", len(data) > INLINE_BODY_BYTES, threading.get_ident() == loop))
        if len(data) > INLINE_BODY_BYTES:
            entered.set()
            gate.wait(timeout=10)  # a hang guard: a blocked loop comes back and fails
        return decode(data)

    def recorded_messages(body: Any, key: str = "messages") -> Any:
        ran.append(("messages", len(body[key]) > 1, threading.get_ident() == loop))
        return parse_messages(body, key)

    monkeypatch.setattr(schemas, "decode_json", gated_decode)
    monkeypatch.setattr(schemas, "chat_messages", recorded_messages)
    many = [{"role": "user", "content": "hi"}] * (INLINE_BODY_BYTES // 16)
    big = _ollama_chat({"num_predict": 1}) | {"messages": many}
    replies: list[int] = []

    async def post_big() -> None:
        replies.append((await _post(client, "/api/chat", big))[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post_big)
        await wait_until(entered.is_set, "the large body is being decoded")
        assert fake.cpu_limiter.statistics().borrowed_tokens == 1
        # Meanwhile the loop decodes and answers a small request itself.
        assert (await _post(client, "/api/chat", _ollama_chat({})))[0] == 200
        assert gate.is_set() is False
        gate.set()
    assert replies == [200]
    assert len(fake.requests[-1].messages or ()) == len(many)
    assert ran == [
        ("decode", True, False),
        ("decode", False, True),  # the small body, while the large one waits
        ("messages", False, True),
        ("messages", True, False),  # the large body's messages, once its gate opened
    ]


# ---- large replies ----


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completion", {"prompt": "hi", "stream": False, "logprobs": True, "top_logprobs": 20}),
        ("/api/generate", _ollama_generate({}) | {"logprobs": True, "top_logprobs": 20}),
        ("/v1/chat/completions", _openai_chat({"logprobs": True, "top_logprobs": 20})),
    ],
    ids=["native", "ollama", "openai"],
)
async def test_a_large_whole_reply_is_made_off_the_loop(
    client: Any, fake: FakeRunner, monkeypatch: pytest.MonkeyPatch, path: str, body: Any
) -> None:
    loop = threading.get_ident()
    made_on_loop: list[bool] = []
    encode = replies._encode

    def recorded(make: Any) -> bytes:
        made_on_loop.append(threading.get_ident() == loop)
        return encode(make)

    monkeypatch.setattr(replies, "_encode", recorded)
    fake.endless = True
    small = 4  # tokens, each with 20 alternatives: 84 logprob entries, made here
    large = replies.INLINE_REPLY_SIZE // 21 + 1
    sizes = []
    for tokens in (small, large):
        options = {"max_tokens": tokens} if path.startswith("/v1") else {"num_predict": tokens}
        data = body | options if path.startswith("/v1") else _with_options(body, options)
        response = await client.post(path, json=data)
        assert response.status_code == 200
        sizes.append(len(await response.get_data()))
    assert made_on_loop == [False]  # only the large reply, on a worker thread
    assert sizes[1] > sizes[0]


def _with_options(body: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return body | {"options": {**body.get("options", {}), **options}}
