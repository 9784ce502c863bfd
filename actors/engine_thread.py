"""The engine thread: one OS thread, for the life of the tree, that runs every MLX call.

MLX streams belong to the thread that created them and Trio's worker threads are reused
arbitrarily, so the model is loaded and stepped here and nowhere else. Nothing frees it here:
its arrays are released when the last reference to the engine goes, after the tree has
stopped and joined this thread. The thread blocks on its job queue when idle (no polling).
Trio tasks hand it a function with ``await thread.run(fn, *args)``; the result comes back
through ``trio.from_thread``.

Cancellation: a job that has not started when its caller is cancelled is skipped; a job that
is running is waited for (shielded), because interrupting MLX mid-step would leave the model
state undefined, unless the caller chose ``abandon_on_cancel`` (the model load does). The
scheduler's jobs are single steps, so that wait is bounded by one step.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

T = TypeVar("T")

log = logging.getLogger("mlxrunner.engine_thread")


@attrs.define(eq=False)
class _Job:
    fn: Callable[[], Any]
    token: trio.lowlevel.TrioToken
    done: trio.Event = attrs.field(factory=trio.Event)
    started: bool = False
    abandoned: bool = False
    value: Any = None
    error: BaseException | None = None


class EngineThread:
    """Runs submitted functions one at a time on a single dedicated thread."""

    def __init__(self, name: str = "mlx-engine") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        # A job still running after its caller gave up on it (see ``run``).
        self.abandoned_running = False
        self._finalizers: list[Callable[[], None]] = []

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                for release in reversed(self._finalizers):
                    try:
                        release()
                    except Exception:  # the thread must still end; the log says why
                        log.exception("releasing engine state failed")
                self._finalizers.clear()
                return
            with self._lock:
                if job.abandoned:
                    continue
                job.started = True
            try:
                job.value = job.fn()
            except BaseException as exc:  # handed to the awaiting task, which re-raises it
                job.error = exc
            self.abandoned_running = False
            # Fire and forget: waiting for the loop to run this (``from_thread.run_sync``)
            # kept the engine thread idle while the loop was busy writing responses (6% of
            # its time at 64 streams on the GPU, measured with py-spy).
            with contextlib.suppress(trio.RunFinishedError):
                job.token.run_sync_soon(job.done.set)

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        abandon_on_cancel: bool = False,
        interrupt: threading.Event | None = None,
    ) -> T:
        """Run ``fn(*args)`` on the engine thread and return its result (or raise its error).

        ``abandon_on_cancel``: if cancelled while ``fn`` runs, return at once and let it finish
        unobserved (for a model load, which no one should have to wait out on a second Ctrl-C).
        ``interrupt``: set when cancelled, for a ``fn`` that watches it to return early.
        """
        job = _Job(fn=lambda: fn(*args), token=trio.lowlevel.current_trio_token())
        self._jobs.put(job)
        try:
            await job.done.wait()
        except trio.Cancelled:
            if interrupt is not None:
                interrupt.set()
            with self._lock:
                job.abandoned = True
                running = job.started
                self.abandoned_running = running and abandon_on_cancel
            if running and not abandon_on_cancel:
                with trio.CancelScope(shield=True):
                    await job.done.wait()
            raise
        if job.error is not None:
            raise job.error
        value: T = job.value
        return value

    def on_stop(self, release: Callable[[], None]) -> None:
        """Run ``release`` on this thread after its last job, before it ends; the last one
        registered runs first (like ``contextlib.ExitStack``)."""
        self._finalizers.append(release)

    def stop(self) -> None:
        """Let the thread finish its queue, run its ``on_stop`` releases and exit (it is a
        daemon: exit never waits on it)."""
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        """Wait for the thread to exit; whether it did.

        MLX keeps per-thread state (streams with worker threads) that must be torn down when
        this thread exits, not by the process's static destructors: the latter abort with
        "terminate called without an active exception".
        """
        self._thread.join(timeout)
        return not self._thread.is_alive()
