"""The supervision tree: one nursery for the signal handler, the pipelines, the loader and
the scheduler.

``open_runner`` starts the engine thread and the actors and yields the ``Runner`` client; the
caller runs the HTTP actor (or ``mlxrunner run``) in its body. One-cancels-all: an actor that
crashes cancels the body, and the error leaves ``open_runner``. Requests cannot crash it:
each runs as a task in the pipelines nursery and ends with an item on its own channel.

Start order: the signal handler, the pipelines nursery, then the loader, which loads the
model on the engine thread (reporting progress into the runner), starts the scheduler and
marks the runner ready; until then ``submit`` raises ``UnavailableError("loading")``.

Signals (``handle_signals=True``): the first SIGINT/SIGTERM stops admission (``/health`` and
new requests answer 503) and ends the queued requests at once (never admitted), lets running
generations go on for ``grace`` seconds, cuts what is left, then sets ``runner.stopped`` so
the HTTP server closes. A second signal cuts every open generation at once and stops the HTTP
server; responses get up to ``FLUSH_SECONDS`` to write their last record before the tree is
cancelled (a third signal cancels it at once). Work cut or never admitted ends with a
``GenerationCut``, never as a success.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from actors import loading
from actors.config import LoadFn, RunnerConfig
from actors.engine_thread import EngineThread
from actors.runner import Ready, Runner
from actors.scheduler import Scheduler
from actors.scheduler_records import SchedulerConfig

log = logging.getLogger("mlxrunner.tree")

# After the grace period (or a second signal), how long cut streams get to deliver their
# last record.
FLUSH_SECONDS = 2.0
SHUTTING_DOWN = "the server is shutting down"
# How long closing the tree waits for the engine thread to finish its last job.
JOIN_SECONDS = 30.0


async def _loader(
    runner: Runner,
    thread: EngineThread,
    load: LoadFn,
    config: RunnerConfig,
    nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()

    def progress(fraction: float) -> None:  # engine thread
        runner.progress = fraction

    loaded = await thread.run(load, progress, abandon_on_cancel=True)
    # The model and its caches are MLX state: freed on the engine thread when it stops.
    thread.on_stop(loaded.engine.close)
    scheduler = Scheduler(
        SchedulerConfig(
            max_queue=config.max_queue,
            parallel=config.parallel,
            cache_bytes_limit=int(config.cache_gb * (1 << 30)),
            reader_pause_tokens=config.reader_pause_tokens,
            reader_timeout=config.reader_timeout,
        ),
        loaded.engine,
        thread,
    )
    await nursery.start(_supervise_scheduler, scheduler, runner)
    runner.set_ready(Ready(scheduler=scheduler, tokenizer=loaded.tokenizer, info=loaded.info))
    log.info("model %s ready", loaded.info.name)


async def _supervise_scheduler(
    scheduler: Scheduler,
    runner: Runner,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await scheduler.run(task_status=task_status)
    except Exception:
        # The scheduler has told every open request why; give them a moment to pass the
        # error on to their clients before the tree (and the HTTP server) comes down.
        runner.begin_shutdown()
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_SECONDS):
            await runner.wait_idle()
        raise


async def _signals(
    runner: Runner,
    grace: float,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: draining for up to %.1f s", signal.Signals(signum).name, grace)
            break
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, runner, grace)
            # The drain may end (and the HTTP server close) before a second signal comes.
            async for again in signals:
                log.warning("%s again: ending open generations now", signal.Signals(again).name)
                nursery.cancel_scope.cancel()
                break
        loaded = runner.ready is not None
        stop_now(runner)
        if loaded:  # a load in progress has nothing to flush, and no one should wait for it
            with trio.move_on_after(FLUSH_SECONDS):
                async for _ in signals:
                    break
        everything.cancel()


async def drain(runner: Runner, grace: float) -> None:
    """Stop admitting (queued requests end now, never admitted), let running generations
    finish for ``grace`` s, cut the rest, and stop once the engine has removed them all."""
    runner.begin_shutdown()
    scheduler = runner.ready.scheduler if runner.ready is not None else None
    if scheduler is not None:
        scheduler.refuse_queued(SHUTTING_DOWN)
    with trio.move_on_after(grace):
        await runner.wait_idle()
    if scheduler is not None:
        scheduler.cancel_all(SHUTTING_DOWN)
    with trio.move_on_after(FLUSH_SECONDS):
        if scheduler is not None:
            await scheduler.wait_settled()
        await runner.wait_idle()
    runner.stopped.set()


def stop_now(runner: Runner) -> None:
    """Cut every open generation now and ask the HTTP server to stop (a second signal)."""
    runner.begin_shutdown()
    if runner.ready is not None:
        runner.ready.scheduler.cancel_all("the server is stopping now")
    runner.stopped.set()


def engine_thread_alive() -> bool:
    """Whether an engine thread is still inside MLX (after an abandoned load).

    Then the process must leave with ``os._exit``: MLX's static destructors abort ("terminate
    called without an active exception") while a thread still uses it.
    """
    return any(t.name == "mlx-engine" and t.is_alive() for t in threading.enumerate())


@asynccontextmanager
async def open_runner(
    *,
    load: LoadFn | None = None,
    handle_signals: bool = False,
    **options: Any,
) -> AsyncIterator[Runner]:
    """Open the actor tree and yield its client. ``options`` are ``RunnerConfig`` fields."""
    config = RunnerConfig(**options)
    if load is None:
        load = loading.model_loader(config)
    thread = EngineThread()
    thread.on_stop(_end_mlx_thread)
    runner = Runner(
        max_open=config.max_open,
        cpu_workers=config.cpu_workers,
        stream_interval=config.stream_interval,
    )
    try:
        with trio.CancelScope() as everything:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(_signals, runner, config.grace, everything)
                await nursery.start(runner.run_pipelines)
                await nursery.start(_loader, runner, thread, load, config, nursery)
                try:
                    yield runner
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        thread.stop()
        # After a second signal, a load still running is not waited for (the caller exits
        # with os._exit then: see ``engine_thread_alive``).
        wait = 0.0 if thread.abandoned_running else JOIN_SECONDS
        with trio.CancelScope(shield=True):
            if not await trio.to_thread.run_sync(thread.join, wait) and wait:
                log.warning("engine thread still busy after %.0f s; exiting anyway", wait)


def _end_mlx_thread() -> None:
    # Imported here: a tree with a fake engine never loads MLX until its thread ends.
    from runtime.engine.lifecycle import end_mlx_thread

    end_mlx_thread()
