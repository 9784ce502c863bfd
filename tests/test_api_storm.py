"""A disconnect storm against the real tree over a tiny real model (``tests/storm.py``).

Afterwards nothing is left behind: no sequence runs or waits, the KV cache holds only what
the prefix cache retained, the process has the threads and open descriptors it had before,
nothing was logged as a warning or an error, and the server still answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.live_server import make_model, open_live_server
from tests.storm import storm

FAST_REQUESTS = 100
SOAK_REQUESTS = int(os.environ.get("MLXRUNNER_SOAK_REQUESTS", "1000"))
SEED = 2026


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("storm") / "tiny")


async def storm_leaves_nothing_behind(
    folder: Path, requests: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_live_server(folder, parallel=8) as live:
        figures = await storm(live, requests=requests, seed=SEED)
    print(figures.summary())
    assert figures.completed > 0
    assert figures.after is not None
    assert figures.after.prefix_cache_entries > 0  # what was kept, and nothing else
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_disconnect_storm_leaves_nothing_behind(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await storm_leaves_nothing_behind(folder, FAST_REQUESTS, caplog)


@pytest.mark.soak
async def test_disconnect_storm_soak(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    await storm_leaves_nothing_behind(folder, SOAK_REQUESTS, caplog)
