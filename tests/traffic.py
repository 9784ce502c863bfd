"""What the suite's load tests send and how they read the answers, over raw sockets.

An ``Ask`` is one generation request of any kind: native, Ollama or OpenAI; completion or
chat; streaming or not; a short prompt or a long one (a shared preamble: several prefill
chunks, and prefix-cache reuse). Every request says ``Connection: close``, so an answer is
whole when the server closes the connection. ``check_complete`` and ``check_refused`` say
what a whole answer must look like; ``burst`` sends many at once and counts the statuses.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import attrs
import trio

from tests.live_server import MODEL_NAME

ROUTES = ("/completion", "/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions")
# About 200 tokens of the tiny tokenizer: 13 prefill chunks of 16.
PREAMBLE = "You are a careful assistant. Answer briefly and well. " * 4
RECEIVE_LIMIT = 60  # seconds: a hang guard for one client


@attrs.frozen
class Ask:
    route: str
    stream: bool
    tokens: int  # <= 0: no limit (the context's)
    long: bool = False

    @property
    def kind(self) -> str:
        return f"{self.route} {'stream' if self.stream else 'whole'}{' long' if self.long else ''}"

    @property
    def openai(self) -> bool:
        return self.route.startswith("/v1/")

    def body(self, index: int) -> dict[str, Any]:
        text = f"{PREAMBLE if self.long else ''}Question {index}: what comes next?"
        limit = {"num_predict": self.tokens} if self.tokens > 0 else {}
        if self.route == "/completion":
            return {"prompt": text, "stream": self.stream, "options": limit}
        chat = self.route in ("/api/chat", "/v1/chat/completions")
        prompt: dict[str, Any] = (
            {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        )
        if not self.openai:
            return {"model": MODEL_NAME, **prompt, "stream": self.stream, "options": limit}
        openai_limit = {"max_tokens": self.tokens} if self.tokens > 0 else {}
        return {"model": MODEL_NAME, **prompt, "stream": self.stream, **openai_limit}

    def request(self, host: str, port: int, index: int) -> bytes:
        data = json.dumps(self.body(index)).encode()
        head = (
            f"POST {self.route} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        return head + data


def every_kind(count: int, tokens: int) -> list[Ask]:
    """``count`` asks cycling through the routes, streaming every other one."""
    return [Ask(ROUTES[i % len(ROUTES)], i % 2 == 0, tokens) for i in range(count)]


async def exchange(host: str, port: int, ask: Ask, index: int) -> bytes:
    """Send one request and read the whole answer."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(ask.request(host, port, index))
    received = b""
    with trio.fail_after(RECEIVE_LIMIT):
        while data := await stream.receive_some(65536):
            received += data
    await stream.aclose()
    return received


def head_and_body(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body (de-chunked) of a whole answer."""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(lines[0].split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def check_complete(ask: Ask, received: bytes) -> str | None:
    """What is wrong with an answer read to its end that must be a whole success, if any."""
    if not received.startswith(b"HTTP/1.1 200"):
        return f"answered {received[:200]!r}"
    body = head_and_body(received)[2]
    if ask.openai:
        ended = b"data: [DONE]" in body if ask.stream else b'"finish_reason"' in body
    else:
        ended = b'"done":true' in body
    return None if ended else f"no final record in {body[-300:]!r}"


def check_refused(received: bytes) -> str | None:
    """What is wrong with an answer that must be a 429 with ``Retry-After``, if any."""
    status, headers, body = head_and_body(received)
    if status != 429 or int(headers.get("retry-after", "0")) < 1:
        return f"not a 429 with Retry-After: {received[:300]!r}"
    if not isinstance(json.loads(body).get("error"), str):
        return f"no error message: {body!r}"
    return None


async def burst(host: str, port: int, asks: list[Ask]) -> tuple[Counter[int], list[str]]:
    """Send every ask at once; (statuses, problems): each answer must be a whole success
    or a refusal (429 with ``Retry-After``)."""
    statuses: Counter[int] = Counter()
    problems: list[str] = []

    async def one(index: int, ask: Ask) -> None:
        received = await exchange(host, port, ask, index)
        status = head_and_body(received)[0]
        statuses[status] += 1
        problem = check_refused(received) if status == 429 else check_complete(ask, received)
        if problem:
            problems.append(f"{ask.kind}: {problem}")

    async with trio.open_nursery() as nursery:
        for index, ask in enumerate(asks):
            nursery.start_soon(one, index, ask)
    return statuses, problems
