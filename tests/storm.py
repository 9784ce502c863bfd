"""A disconnect storm: many real-socket requests of mixed kinds, each left at a random moment.

``plan`` draws every request from a seeded RNG: the route (native, Ollama, OpenAI; completion
or chat), streaming or not, a short prompt or a long one that shares a preamble with others
(several prefill chunks, and prefix-cache reuse), how many tokens to ask for, and when and how
the client leaves. The moments are byte counts, not times: part way through sending the
request, right after sending it, after reading the first ``k`` bytes of the answer, or never
(it reads the whole answer, which must then be a success). Half of the clients close
politely (FIN), the others reset the connection (RST).

``run_storm`` sends the plan with ``concurrency`` clients at once and counts what happened;
the caller checks the server afterwards (``tests/live_server.py``).
"""

from __future__ import annotations

import json
import random
import socket
import struct
from collections import Counter
from typing import Any, Literal

import attrs
import trio

from tests.live_server import MODEL_NAME

Moment = Literal["sending", "sent", "reading", "complete"]
ROUTES = ("/completion", "/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions")
# About 200 tokens of the tiny tokenizer: 13 prefill chunks of 16.
PREAMBLE = "You are a careful assistant. Answer briefly and well. " * 4
RECEIVE_LIMIT = 60  # seconds: a hang guard for one client


@attrs.frozen
class Planned:
    route: str
    stream: bool
    long: bool
    tokens: int
    moment: Moment
    cut: int  # bytes: of the request while sending, of the answer while reading
    reset: bool  # leave with RST instead of FIN

    @property
    def kind(self) -> str:
        return f"{self.route} {'stream' if self.stream else 'whole'}{' long' if self.long else ''}"

    def body(self, index: int) -> dict[str, Any]:
        text = f"{PREAMBLE if self.long else ''}Question {index}: what comes next?"
        if self.route == "/completion":
            return {"prompt": text, "stream": self.stream, "options": {"num_predict": self.tokens}}
        if self.route in ("/api/generate", "/api/chat"):
            prompt: dict[str, Any] = (
                {"prompt": text}
                if self.route == "/api/generate"
                else {"messages": [{"role": "user", "content": text}]}
            )
            options = {"num_predict": self.tokens}
            return {"model": MODEL_NAME, **prompt, "stream": self.stream, "options": options}
        prompt = (
            {"prompt": text}
            if self.route == "/v1/completions"
            else {"messages": [{"role": "user", "content": text}]}
        )
        return {"model": MODEL_NAME, **prompt, "stream": self.stream, "max_tokens": self.tokens}


def plan(requests: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    moments: tuple[Moment, ...] = ("sending", "sent", "reading", "reading", "complete")
    out = []
    for _ in range(requests):
        moment = rng.choice(moments)
        out.append(
            Planned(
                route=rng.choice(ROUTES),
                stream=rng.random() < 0.7,
                long=rng.random() < 0.3,
                tokens=rng.randint(1, 32),
                moment=moment,
                cut=rng.randint(1, 4096),
                reset=rng.random() < 0.5,
            )
        )
    return out


def request_bytes(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + data


@attrs.define
class StormReport:
    requests: int = 0
    by_moment: Counter[str] = attrs.field(factory=Counter)
    by_kind: Counter[str] = attrs.field(factory=Counter)
    statuses: Counter[int] = attrs.field(factory=Counter)  # of answers whose head was read
    completed: int = 0
    problems: list[str] = attrs.field(factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        return (
            f"{self.requests} requests: {dict(sorted(self.by_moment.items()))}; "
            f"{self.completed} read to the end; statuses seen {dict(sorted(self.statuses.items()))}; "
            f"{self.server_errors} server errors; {len(self.problems)} problems"
        )


async def run_storm(
    host: str, port: int, *, requests: int, seed: int, concurrency: int = 16
) -> StormReport:
    report = StormReport()
    planned = list(enumerate(plan(requests, seed)))
    send, receive = trio.open_memory_channel[tuple[int, Planned]](len(planned))
    for item in planned:
        send.send_nowait(item)
    send.close()

    async def client() -> None:
        async for index, p in receive:
            await _one(host, port, index, p, report)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return report


async def run_one(host: str, port: int, p: Planned, index: int = 0) -> StormReport:
    """One planned request alone (warm-ups, checks)."""
    report = StormReport()
    await _one(host, port, index, p, report)
    return report


async def _one(host: str, port: int, index: int, p: Planned, report: StormReport) -> None:
    report.requests += 1
    report.by_moment[p.moment] += 1
    report.by_kind[p.kind] += 1
    data = request_bytes(host, port, p.route, p.body(index))
    stream = await trio.open_tcp_stream(host, port)
    try:
        if p.moment == "sending":
            await stream.send_all(data[: p.cut % len(data)])
            return
        await stream.send_all(data)
        if p.moment == "sent":
            return
        limit = p.cut if p.moment == "reading" else None
        received = await _receive(stream, limit)
        if received.startswith(b"HTTP/1.1 "):
            report.statuses[int(received[9:12])] += 1
        if p.moment == "complete":
            report.completed += 1
            problem = _check_complete(p, received)
            if problem:
                report.problems.append(f"request {index} ({p.kind}): {problem}")
    finally:
        if p.reset:  # SO_LINGER 0: close() sends RST
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()


async def _receive(stream: trio.SocketStream, limit: int | None) -> bytes:
    received = b""
    with trio.fail_after(RECEIVE_LIMIT):
        while limit is None or len(received) < limit:
            data = await stream.receive_some(65536)
            if not data:
                break
            received += data
    return received


def _check_complete(p: Planned, received: bytes) -> str | None:
    """A request read to its end must have been answered in full, successfully."""
    if not received.startswith(b"HTTP/1.1 200"):
        return f"answered {received[:200]!r}"
    body = received.partition(b"\r\n\r\n")[2]
    if p.route.startswith("/v1/"):
        ended = b"data: [DONE]" in body if p.stream else b'"finish_reason"' in body
    else:
        ended = b'"done":true' in body
    return None if ended else f"no final record in {body[-300:]!r}"
