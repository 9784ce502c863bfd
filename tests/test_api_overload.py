"""Overload: a burst beyond ``--parallel`` + ``--max-queue`` is refused at once with 429 and
``Retry-After``, and every request that was admitted still completes. No request hangs.

The fast test holds the engine (admitted sequences make no progress until the test lets them
go), so "at once" is exact: every refusal arrives while nothing admitted can finish. The soak
variant bursts a tiny real model with no hold: each answer is a success or a refusal.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.testing import ScriptedEngine, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from tests.api_fakes import serve_app
from tests.live_server import MODEL_NAME, drained, make_model, open_live_server
from tests.traffic import burst, check_complete, every_kind, exchange
from tests.waits import wait_until

PARALLEL = 2
QUEUE = 2
BURST = 12
SOAK_BURST = int(os.environ.get("MLXRUNNER_SOAK_BURST", "300"))


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


async def test_a_burst_beyond_capacity_is_refused_at_once_and_the_admitted_complete() -> None:
    engine = HeldEngine()
    admitted_asks = every_kind(PARALLEL + QUEUE, tokens=3)
    async with open_test_runner(
        engine, tokenizer=tiny_tokenizer(), parallel=PARALLEL, max_queue=QUEUE
    ) as harness:
        app = create_app(harness.runner, ApiConfig(model_name=MODEL_NAME))
        async with serve_app(app) as (host, port), trio.open_nursery() as nursery:
            admitted: dict[int, bytes] = {}

            async def admit(index: int) -> None:
                admitted[index] = await exchange(host, port, admitted_asks[index], index)

            def placed(n: int) -> bool:
                s = harness.statistics()
                running = min(n, PARALLEL)
                return (s.active_sequences, s.queued_requests) == (running, n - running)

            # One at a time: the queue holds QUEUE more only once the scheduler has admitted
            # the first PARALLEL (until then they wait in the queue too).
            for index in range(PARALLEL + QUEUE):
                nursery.start_soon(admit, index)
                await wait_until(functools.partial(placed, index + 1), f"request {index} placed")

            statuses, problems = await burst(host, port, every_kind(BURST, tokens=3))
            # Every refusal came while the engine held: nothing admitted could have finished.
            assert not engine.release.is_set()
            assert statuses == {429: BURST}
            assert problems == []
            assert placed(PARALLEL + QUEUE)
            engine.release.set()
        assert sorted(admitted) == list(range(PARALLEL + QUEUE))
        for index, received in admitted.items():
            assert check_complete(admitted_asks[index], received) is None
        await wait_until(lambda: drained(harness.statistics), "drained")
        assert len(engine.added) == PARALLEL + QUEUE  # no refused request reached the engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("overload") / "tiny")


@pytest.mark.soak
async def test_overload_soak_every_answer_is_a_success_or_a_refusal(folder: Path) -> None:
    async with open_live_server(folder, parallel=PARALLEL, max_queue=QUEUE) as live:
        statuses, problems = await burst(live.host, live.port, every_kind(SOAK_BURST, tokens=8))
        print(f"overload soak: statuses {dict(statuses)}")
        assert problems == []
        assert set(statuses) <= {200, 429}
        assert statuses[200] >= PARALLEL + QUEUE
        await wait_until(lambda: drained(live.statistics), "drained")
