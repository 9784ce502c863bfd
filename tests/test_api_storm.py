"""A disconnect storm against the real tree over a tiny real model (``tests/storm.py``).

Afterwards nothing is left behind: no sequence runs or waits, the KV cache holds only what
the prefix cache retained, the process has the threads and open descriptors it had before,
nothing was logged as an error, and the server still answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.api_fakes import raw_request
from tests.live_server import (
    busy_threads,
    drained,
    make_model,
    open_descriptors,
    open_live_server,
)
from tests.storm import ROUTES, Planned, run_one, run_storm
from tests.waits import read_until, wait_until

FAST_REQUESTS = 100
SOAK_REQUESTS = 1000


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("storm") / "tiny")


async def storm_leaves_nothing_behind(
    folder: Path, requests: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_live_server(folder, parallel=8) as live:
        # Every kind once, read to the end: lazy imports and first worker threads are done
        # before the baseline is taken.
        for route in ROUTES:
            for stream in (False, True):
                report = await run_one(
                    live.host, live.port, Planned(route, stream, True, 4, "complete", 0, False)
                )
                assert report.problems == [], report.problems
        await wait_until(lambda: drained(live.statistics), "warm-up drained")
        descriptors, threads = open_descriptors(), busy_threads()

        report = await run_storm(live.host, live.port, requests=requests, seed=2026)
        print(report.summary())
        assert report.problems == []
        assert report.server_errors == 0
        assert report.completed > 0

        await wait_until(lambda: drained(live.statistics), "every sequence gone")
        stats = live.statistics()
        assert stats.prefix_cache_entries > 0  # what was kept, and nothing else
        await wait_until(
            lambda: open_descriptors() == descriptors, f"descriptors back to {descriptors}"
        )
        assert busy_threads() == threads

        health = await raw_request(live.host, live.port, "GET", "/health")
        assert (await read_until(health, b"}", eof_ok=True)).startswith(b"HTTP/1.1 200")
        await health.aclose()
        after = await run_one(
            live.host, live.port, Planned("/completion", True, False, 3, "complete", 0, False)
        )
        assert after.problems == []
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


async def test_disconnect_storm_leaves_nothing_behind(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await storm_leaves_nothing_behind(folder, FAST_REQUESTS, caplog)


@pytest.mark.soak
async def test_disconnect_storm_soak(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    await storm_leaves_nothing_behind(folder, SOAK_REQUESTS, caplog)
