"""A disconnect storm: many real-socket requests of mixed kinds, each left at a random moment.

``plan`` draws every request from a seeded RNG: its kind (a ``tests.traffic.Ask``: route,
streaming, prompt length, tokens) and when and how the client leaves. The moments are byte
counts, not times: part way through sending the request, right after sending it, after
reading the first ``k`` bytes of the answer, or never (it reads the whole answer, which must
then be a success). Half of the clients close politely (FIN), the others reset (RST).

``storm`` warms the server up, takes a baseline, sends the plan with ``concurrency``
clients at once, and checks that nothing is left behind: no sequence runs or waits, the KV
cache holds only the prefix cache's entries, the process has the threads and open
descriptors it had before, and the server still answers. It returns the figures.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from typing import Literal

import attrs
import trio

from actors.messages import Statistics
from tests.live_server import Live, busy_threads, drained, open_descriptors
from tests.traffic import ROUTES, Ask, check_complete, exchange
from tests.waits import wait_until

Moment = Literal["sending", "sent", "reading", "complete"]
RECEIVE_LIMIT = 60  # seconds: a hang guard for one client


@attrs.frozen
class Planned:
    ask: Ask
    moment: Moment
    cut: int  # bytes: of the request while sending, of the answer while reading
    reset: bool  # leave with RST instead of FIN


def plan(requests: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    moments: tuple[Moment, ...] = ("sending", "sent", "reading", "reading", "complete")
    return [
        Planned(
            Ask(
                route=rng.choice(ROUTES),
                stream=rng.random() < 0.7,
                tokens=rng.randint(1, 32),
                long=rng.random() < 0.3,
            ),
            moment=rng.choice(moments),
            cut=rng.randint(1, 4096),
            reset=rng.random() < 0.5,
        )
        for _ in range(requests)
    ]


@attrs.define
class StormFigures:
    requests: int = 0
    by_moment: Counter[str] = attrs.field(factory=Counter)
    by_kind: Counter[str] = attrs.field(factory=Counter)
    statuses: Counter[int] = attrs.field(factory=Counter)  # of answers whose head was read
    completed: int = 0
    problems: list[str] = attrs.field(factory=list)
    descriptors: tuple[int, int] = (0, 0)  # before, after
    threads: tuple[int, int] = (0, 0)
    after: Statistics | None = None

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        s = self.after
        cache = (
            f"cache {s.cache_bytes} B = prefix cache {s.prefix_cache_bytes} B "
            f"({s.prefix_cache_entries} entries); active {s.active_sequences}, "
            f"queued {s.queued_requests}"
            if s is not None
            else "not checked"
        )
        return (
            f"{self.requests} requests, left {dict(sorted(self.by_moment.items()))}; "
            f"{self.completed} read to the end; statuses {dict(sorted(self.statuses.items()))}; "
            f"{self.server_errors} server errors; afterwards {cache}; "
            f"descriptors {self.descriptors[0]} -> {self.descriptors[1]}, "
            f"threads {self.threads[0]} -> {self.threads[1]}"
        )


async def storm(live: Live, *, requests: int, seed: int, concurrency: int = 16) -> StormFigures:
    """The storm and its checks (``AssertionError`` for anything left behind)."""
    # Every kind once, read to the end: lazy imports and first worker threads come before
    # the baseline.
    warm = StormFigures()
    for route in ROUTES:
        for stream in (False, True):
            await _one(
                live, 0, Planned(Ask(route, stream, 4, long=True), "complete", 0, False), warm
            )
    assert warm.problems == [], warm.problems
    await wait_until(lambda: drained(live.statistics), "warm-up drained")
    descriptors, threads = open_descriptors(), busy_threads()

    figures = StormFigures()
    planned = list(enumerate(plan(requests, seed)))
    send, receive = trio.open_memory_channel[tuple[int, Planned]](len(planned))
    for item in planned:
        send.send_nowait(item)
    send.close()

    async def client() -> None:
        async for index, p in receive:
            await _one(live, index, p, figures)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)

    assert figures.problems == [], figures.problems[:5]
    assert figures.server_errors == 0, figures.statuses
    await wait_until(lambda: drained(live.statistics), "every sequence gone")
    figures.after = live.statistics()
    await wait_until(lambda: open_descriptors() == descriptors, f"{descriptors} descriptors")
    figures.descriptors = (descriptors, open_descriptors())
    assert busy_threads() == threads
    figures.threads = (sum(threads.values()), sum(busy_threads().values()))
    health = await exchange_get(live, "/health")
    assert health.startswith(b"HTTP/1.1 200"), health
    again = await exchange(live.host, live.port, Ask("/completion", True, 3), 0)
    assert check_complete(Ask("/completion", True, 3), again) is None, again
    return figures


async def exchange_get(live: Live, path: str) -> bytes:
    stream = await trio.open_tcp_stream(live.host, live.port)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    received = await _receive(stream, None)
    await stream.aclose()
    return received


async def _one(live: Live, index: int, p: Planned, figures: StormFigures) -> None:
    figures.requests += 1
    figures.by_moment[p.moment] += 1
    figures.by_kind[p.ask.kind] += 1
    data = p.ask.request(live.host, live.port, index)
    stream = await trio.open_tcp_stream(live.host, live.port)
    try:
        if p.moment == "sending":
            await stream.send_all(data[: p.cut % len(data)])
            return
        await stream.send_all(data)
        if p.moment == "sent":
            return
        received = await _receive(stream, p.cut if p.moment == "reading" else None)
        if len(received) >= 12:  # the status line's code: "HTTP/1.1 200"
            figures.statuses[int(received[9:12])] += 1
        if p.moment == "complete":
            figures.completed += 1
            problem = check_complete(p.ask, received)
            if problem:
                figures.problems.append(f"request {index} ({p.ask.kind}): {problem}")
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
