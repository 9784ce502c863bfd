"""The scheduler actor: admission, the batch loop, and routing of tokens to requests.

It owns the bounded request channel (``max_queue`` waiting requests), the set of running
sequences (at most ``parallel``) and, through the engine, their KV caches. Its loop: admit
waiting requests, then run one engine job on the engine thread that removes departed
sequences, adds admitted ones and advances every running sequence by one step; route each
``TokenEvent`` to its request. It never waits on a consumer: each request's reply channel is
sized for every event its sequence can produce, and a closed one means the requester left.

A requester that leaves calls ``cancel``; the sequence is dropped at the start of the next
engine job, so cancellation costs at most one step. ``cancel_all`` ends every sequence with a
``Dropped`` marker (shutdown).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

import attrs
import trio

from runtime.engine.protocol import EngineStats, SequenceRequest, TokenEvent

if TYPE_CHECKING:
    from actors.engine_thread import EngineThread
    from runtime.engine.protocol import Engine

log = logging.getLogger("mlxrunner.scheduler")


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    max_queue: int = 64
    parallel: int = 4
    # KV-cache memory above which no new sequence is admitted (running ones continue).
    cache_bytes_limit: int = 2 << 30

    def __attrs_post_init__(self) -> None:
        if self.max_queue < 1 or self.parallel < 1:
            raise ValueError("max_queue and parallel must be >= 1")
        if self.cache_bytes_limit < 1:
            raise ValueError("cache_bytes_limit must be >= 1")


@attrs.frozen
class Dropped:
    """The last item a reply channel carries when the scheduler ended the sequence itself."""

    reason: str


@attrs.frozen
class EngineFailed:
    """The last item a reply channel carries when the engine could not run the sequence."""

    error: BaseException


Reply = TokenEvent | Dropped | EngineFailed


@attrs.frozen(eq=False)
class Submission:
    request: SequenceRequest
    reply: trio.MemorySendChannel[Reply]


@attrs.define
class Counters:
    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, engine: Engine, thread: EngineThread) -> None:
        self.config = config
        self._engine = engine
        self._thread = thread
        self._send, self._receive = trio.open_memory_channel[Submission](config.max_queue)
        self._running: dict[int, Submission] = {}
        self._departed: set[int] = set()  # running sequences whose requester left
        self._waiting: set[int] = set()  # queued, not yet admitted
        self._withdrawn: set[int] = set()  # queued ones whose requester left
        self._ids = itertools.count(1)
        self._wakeup = trio.Event()
        self.engine_stats = EngineStats(active_sequences=0, prefilling_sequences=0, cache_bytes=0)
        self.counters = Counters()
        self.steps = 0

    # ---- used by pipelines (all non-blocking) ----

    def next_id(self) -> int:
        return next(self._ids)

    def reply_channel(
        self, max_tokens: int
    ) -> tuple[trio.MemorySendChannel[Reply], trio.MemoryReceiveChannel[Reply]]:
        # One event per prefill chunk and per token, plus the end marker: never full.
        return trio.open_memory_channel[Reply](max_tokens + 2 * 1024 + 4)

    def submit_nowait(self, submission: Submission) -> None:
        """Queue a sequence; ``trio.WouldBlock`` when the queue is full."""
        self._send.send_nowait(submission)
        self._waiting.add(submission.request.seq_id)
        self.counters.requests += 1
        self._wakeup.set()

    def cancel(self, seq_id: int) -> None:
        """The requester left: drop the sequence before the next step."""
        if seq_id in self._waiting:
            self._withdrawn.add(seq_id)
        elif seq_id in self._running:
            self._departed.add(seq_id)
        self._wakeup.set()

    def cancel_all(self, reason: str) -> None:
        """End every queued and running sequence now (their requesters get ``Dropped``)."""
        while True:
            try:
                sub = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            self._waiting.discard(sub.request.seq_id)
            self._end(sub, Dropped(reason))
        for seq_id, sub in list(self._running.items()):
            self._end(sub, Dropped(reason))
            self._departed.add(seq_id)
        self._wakeup.set()

    @property
    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    @property
    def active(self) -> int:
        return len(self._running)

    # ---- the actor ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._loop()
        except BaseException as exc:
            # Open requests learn why instead of hanging; then the tree comes down.
            failure = exc if isinstance(exc, Exception) else RuntimeError("scheduler stopped")
            for sub in list(self._running.values()):
                self._end(sub, EngineFailed(failure))
            while True:
                try:
                    self._end(self._receive.receive_nowait(), EngineFailed(failure))
                except (trio.WouldBlock, trio.ClosedResourceError):
                    break
            raise

    async def _loop(self) -> None:
        while True:
            admitted = self._admit()
            departed = list(self._departed)
            self._departed.clear()
            for seq_id in departed:
                sub = self._running.get(seq_id)
                if sub is not None:
                    sub.reply.close()  # nothing more is routed to a requester that left
            if not self._running and not admitted and not departed:
                self._wakeup = trio.Event()
                if self.queued == 0 and not self._departed:  # else: more to do at once
                    await self._wakeup.wait()
                continue
            results = await self._thread.run(self._job, departed, admitted)
            self.steps += 1
            rejected, events, self.engine_stats = results
            # Departed sequences leave the running set only now that the engine has dropped
            # them, so statistics never show a sequence gone while its cache is still held.
            for seq_id in departed:
                if self._running.pop(seq_id, None) is not None:
                    self.counters.cancelled += 1
            for seq_id, error in rejected:
                sub = self._running.pop(seq_id, None)
                if sub is not None:
                    self._end(sub, EngineFailed(error))
            self._route(events)
            await trio.lowlevel.checkpoint()

    def _admit(self) -> list[SequenceRequest]:
        admitted = []
        while len(self._running) < self.config.parallel:
            if self._running and self.engine_stats.cache_bytes >= self.config.cache_bytes_limit:
                break  # memory-bound: wait for a running sequence to finish
            try:
                sub = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            seq_id = sub.request.seq_id
            self._waiting.discard(seq_id)
            if seq_id in self._withdrawn:  # left while queued: never runs
                self._withdrawn.discard(seq_id)
                sub.reply.close()
                continue
            self._running[seq_id] = sub
            self.counters.prompt_tokens += len(sub.request.prompt)
            admitted.append(sub.request)
        return admitted

    def _job(
        self, departed: list[int], admitted: list[SequenceRequest]
    ) -> tuple[list[tuple[int, BaseException]], list[TokenEvent], EngineStats]:
        """One engine-thread job: leave, join, step (runs on the engine thread)."""
        for seq_id in departed:
            self._engine.remove(seq_id)
        rejected: list[tuple[int, BaseException]] = []
        for request in admitted:
            try:
                self._engine.add(request)
            except (ValueError, RuntimeError) as exc:  # e.g. PromptError: reported to the requester
                rejected.append((request.seq_id, exc))
        events = self._engine.step() if self._engine.has_work() else []
        return rejected, events, self._engine.statistics()

    def _route(self, events: list[TokenEvent]) -> None:
        for event in events:
            sub = self._running.get(event.seq_id)
            if sub is None:
                continue  # departed while the step ran; already removed or about to be
            if event.token is not None:
                self.counters.generated_tokens += 1
            try:
                sub.reply.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.cancel(event.seq_id)
                continue
            except trio.WouldBlock:  # cannot happen with the sized buffer; never block
                log.error("reply buffer full for sequence %d; dropping it", event.seq_id)
                self.cancel(event.seq_id)
                continue
            if event.finish is not None:
                self._running.pop(event.seq_id, None)
                sub.reply.close()

    def _end(self, sub: Submission, marker: Dropped | EngineFailed) -> None:
        self._running.pop(sub.request.seq_id, None)
        if isinstance(marker, Dropped):
            self.counters.cancelled += 1
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            sub.reply.send_nowait(marker)
        sub.reply.close()
