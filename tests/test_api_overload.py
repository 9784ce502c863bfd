"""Overload: a burst beyond ``--parallel`` + ``--max-queue`` is refused at once with 429 and
``Retry-After``, and every request that was admitted still completes. No request hangs.

The fast test holds the engine (admitted sequences make no progress until the test lets them
go), so "at once" is exact: every refusal arrives while nothing admitted can finish. The soak
variant bursts a tiny real model with no hold: each answer is a success or a refusal.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.testing import ScriptedEngine, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from tests.api_fakes import serve_app
from tests.live_server import MODEL_NAME, drained, make_model, open_live_server
from tests.storm import ROUTES, Planned, request_bytes
from tests.waits import wait_until

PARALLEL = 2
QUEUE = 2
BURST = 12
LIMIT = 30  # seconds: a hang guard for every request


class HeldEngine(ScriptedEngine):
    """The scripted engine, making no progress until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(lambda r: [r.prompt[-1]] * r.max_tokens)
        self.release = threading.Event()

    def step(self) -> Any:  # engine thread
        # Held, a step computes nothing; the short wait only keeps it from spinning.
        if not self.release.wait(0.005):
            return []
        return super().step()


def planned(index: int, tokens: int = 3) -> Planned:
    return Planned(ROUTES[index % len(ROUTES)], index % 2 == 0, False, tokens, "complete", 0, False)


async def exchange(host: str, port: int, p: Planned, index: int) -> bytes:
    """Send one request and read the whole answer (the server closes: ``Connection: close``)."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(request_bytes(host, port, p.route, p.body(index)))
    received = b""
    with trio.fail_after(LIMIT):
        while data := await stream.receive_some(65536):
            received += data
    await stream.aclose()
    return received


def head_and_body(received: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_refused(received: bytes) -> None:
    status, headers, body = head_and_body(received)
    assert status == 429, received[:300]
    assert int(headers["retry-after"]) >= 1
    assert isinstance(json.loads(body)["error"], str)


def assert_completed(p: Planned, received: bytes) -> None:
    status, _, body = head_and_body(received)
    assert status == 200, received[:300]
    final = b"data: [DONE]" if p.route.startswith("/v1/") and p.stream else b'"done":true'
    if p.route.startswith("/v1/") and not p.stream:
        final = b'"finish_reason":"length"'
    assert final in body, body[-300:]


async def test_a_burst_beyond_capacity_is_refused_at_once_and_the_admitted_complete() -> None:
    engine = HeldEngine()
    async with open_test_runner(
        engine, tokenizer=tiny_tokenizer(), parallel=PARALLEL, max_queue=QUEUE
    ) as harness:
        app = create_app(harness.runner, ApiConfig(model_name=MODEL_NAME))
        async with serve_app(app) as (host, port), trio.open_nursery() as nursery:
            admitted: dict[int, bytes] = {}

            async def admit(index: int) -> None:
                admitted[index] = await exchange(host, port, planned(index), index)

            def placed(n: int) -> bool:
                s = harness.statistics()
                running = min(n, PARALLEL)
                return (s.active_sequences, s.queued_requests) == (running, n - running)

            # One at a time: the queue holds QUEUE more only once the scheduler has admitted
            # the first PARALLEL (until then they wait in the queue too).
            for index in range(PARALLEL + QUEUE):
                nursery.start_soon(admit, index)
                await wait_until(functools.partial(placed, index + 1), f"request {index} placed")

            refused: dict[int, bytes] = {}

            async def burst(index: int) -> None:
                refused[index] = await exchange(host, port, planned(index), index)

            async with trio.open_nursery() as bursting:
                for index in range(PARALLEL + QUEUE, PARALLEL + QUEUE + BURST):
                    bursting.start_soon(burst, index)
            # Every refusal came while the engine held: nothing admitted could have finished.
            assert not engine.release.is_set()
            assert len(refused) == BURST
            for received in refused.values():
                assert_refused(received)
            assert harness.statistics().active_sequences == PARALLEL
            engine.release.set()
        assert sorted(admitted) == list(range(PARALLEL + QUEUE))
        for index, received in admitted.items():
            assert_completed(planned(index), received)
        await wait_until(lambda: drained(harness.statistics), "drained")
        assert len(engine.added) == PARALLEL + QUEUE  # no refused request reached the engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("overload") / "tiny")


@pytest.mark.soak
async def test_overload_soak_every_answer_is_a_success_or_a_refusal(folder: Path) -> None:
    statuses: dict[int, int] = {}
    async with open_live_server(folder, parallel=PARALLEL, max_queue=QUEUE) as live:

        async def one(index: int) -> None:
            p = planned(index, tokens=8)
            received = await exchange(live.host, live.port, p, index)
            status = head_and_body(received)[0]
            statuses[status] = statuses.get(status, 0) + 1
            if status == 429:
                assert_refused(received)
            else:
                assert_completed(p, received)

        async with trio.open_nursery() as nursery:
            for index in range(300):
                nursery.start_soon(one, index)
        print(f"overload soak: statuses {statuses}")
        assert set(statuses) <= {200, 429}
        assert statuses.get(200, 0) >= PARALLEL + QUEUE
        await wait_until(lambda: drained(live.statistics), "drained")
