"""A real server for the suite's black-box tests: the actor tree over a tiny real model (random
weights, the tokenizer trained in-process) behind hypercorn on 127.0.0.1:<free port>.

``open_live_server`` serves in the caller's Trio loop; ``ServerThread`` serves from a thread of
its own, for synchronous clients (schemathesis, requests). ``Probe`` reads what the suite
checks afterwards: the runner's statistics, the process's threads and open descriptors.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import trio
from quart_trio import QuartTrio

from actors.messages import Statistics
from actors.runner import Runner
from actors.tree import open_runner
from api.app import ApiConfig, create_app
from tests.api_fakes import serve_app

T = TypeVar("T")
MODEL_NAME = "tiny"
CONTEXT = 1024  # room for long prompts; generations are bounded by num_predict in the suite


def make_model(path: Path) -> Path:
    """A tiny llama folder with a context of ``CONTEXT`` positions."""
    from runtime.testing.models import make_tiny_folder

    return make_tiny_folder(path, "llama", max_position_embeddings=CONTEXT)


@attrs.frozen
class Live:
    host: str
    port: int
    runner: Runner
    app: QuartTrio

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def statistics(self) -> Statistics:
        return self.runner.statistics()


@asynccontextmanager
async def open_live_server(
    folder: Path, *, api: ApiConfig | None = None, **options: Any
) -> AsyncIterator[Live]:
    """The tree over the model in ``folder`` (``options``: ``RunnerConfig`` fields) and the
    app on a free port; yields once the model is loaded."""
    options = {"prefill_chunk": 16, "cache_gb": 0.25, **options}
    async with open_runner(
        model=str(folder), models_dir=str(folder.parent / "store"), **options
    ) as runner:
        with trio.fail_after(120):  # load guard
            await runner.wait_ready()
        app = create_app(runner, api or ApiConfig(model_name=MODEL_NAME))
        async with serve_app(app) as (host, port):
            yield Live(host, port, runner, app)


class ServerThread(Generic[T]):
    """A server (``open``: ``open_live_server`` or ``serve_app`` with arguments) in a thread
    with its own ``trio.run``, for synchronous clients; entering yields what ``open`` yields."""

    def __init__(self, open: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        self._open = open
        self._ready = threading.Event()
        self._live: T | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="live-server", daemon=True)

    def __enter__(self) -> T:
        self._thread.start()
        if not self._ready.wait(120):  # start-up guard
            raise AssertionError("the live server did not start")
        if self._live is None:
            raise AssertionError("the live server failed to start") from self._error
        return self._live

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the live server did not stop"
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._open() as live:
            self._live = live
            self._ready.set()
            await self._stop.wait()


# ---- what the suite checks afterwards ----


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def busy_threads() -> Counter[str]:
    """The process's threads by name, less Trio's idle worker threads (named "Trio thread N"
    while they wait for a job; Trio keeps them 10 s after their last one)."""
    return Counter(t.name for t in threading.enumerate() if not t.name.startswith("Trio thread "))


def drained(statistics: Callable[[], Statistics]) -> bool:
    """No sequence runs or waits, and the KV cache holds the prefix cache's entries only."""
    s = statistics()
    return (
        s.active_sequences == 0 and s.queued_requests == 0 and s.cache_bytes == s.prefix_cache_bytes
    )
