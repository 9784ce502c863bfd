"""The scheduler actor: the Trio shell around ``runtime.scheduling.policy.SchedulerPolicy``.

The policy decides (queue, admission against the KV-cache budget, removals, prefix-cache
saves and evictions); this actor only moves data. Its loop: ask the policy for the next job,
run it and one engine step on the engine thread, report the outcome back to the policy, and
route each ``TokenEvent`` to its request's reply channel. It never waits on a consumer: each
reply channel is sized for every event its sequence can produce, and a closed one means the
requester left.

A requester that leaves calls ``cancel``: a queued request frees its queue slot at once, a
running sequence is dropped at the start of the next engine job, so cancellation costs at most
one step. Shutdown ends sequences with a ``Dropped`` marker: ``refuse_queued`` the ones never
admitted, ``cancel_all`` every one; ``wait_settled`` waits until the engine has removed them.

Readers: a requester reports the tokens its reader took (``taken``). A sequence whose reader
lags by ``reader_pause_tokens`` is paused, without holding up the others, until the reader
catches up; one paused for ``reader_timeout`` seconds ends with a ``Dropped`` marker and its
cache is freed (``runtime.scheduling.policy`` decides).

Faults stay local: when an engine step raises, the engine drops the sequences of that step
(``Engine.abort_step``), their requesters get ``EngineFailed`` (a 500, or a 503 when memory ran
out, after which the prefix cache is emptied too), and the others go on; an admission the
engine fails only fails that request. A fault that keeps repeating
(``runtime.scheduling.faults.FaultRule``) is logged in one line and raised as
``EngineFaultError``, which takes the tree down.

Embeddings (``embed``) queue apart from generations (``actors.scheduler_embeddings``): each
engine job computes at most one chunk of them before its steps, and while more chunks wait a
job runs one step only, so generations and embeddings interleave, a step and a chunk at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from typing import TYPE_CHECKING

import trio

from actors.engine_jobs import JobOutcome, StepFailure, removals_only, run_job
from actors.messages import EngineFaultError, GenerationError, UnavailableError
from actors.scheduler_embeddings import EmbeddingRequests
from actors.scheduler_records import (
    Counters,
    Dropped,
    EmbeddingWork,
    EngineFailed,
    Reply,
    SchedulerConfig,
    Submission,
)
from runtime.engine.protocol import EngineStats, TokenEvent
from runtime.errors import RuntimeInputError
from runtime.scheduling.embeddings import EmbedChunk
from runtime.scheduling.faults import FaultTracker, is_out_of_memory
from runtime.scheduling.policy import Job, PolicyConfig, QueueFull, SchedulerPolicy

if TYPE_CHECKING:
    from actors.engine_thread import EngineThread
    from runtime.engine.protocol import Engine
    from runtime.scheduling.prefix_cache import PrefixCounters

log = logging.getLogger("mlxrunner.scheduler")

# Engine steps one job may run while nothing in the loop asks for a new job.
STEPS_PER_JOB = 32
# How long a stopping tree waits for the engine to remove the sequences that ended.
SETTLE_SECONDS = 5.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, engine: Engine, thread: EngineThread) -> None:
        self.config = config
        self._engine = engine
        self._thread = thread
        self._policy = SchedulerPolicy[Submission](
            PolicyConfig(
                max_queue=config.max_queue,
                parallel=config.parallel,
                cache_bytes=config.cache_bytes_limit,
                kv_bytes_per_token=max(1, engine.kv_bytes_per_token),
                prefix_cache=config.prefix_cache,
                pause_unread=config.reader_pause_tokens,
                resume_unread=config.reader_pause_tokens // 2,
                reader_timeout=config.reader_timeout,
            )
        )
        self._ids = itertools.count(1)
        self._wakeup = trio.Event()
        self._job_done = trio.Event()  # set (and replaced) after each job
        # Set from the loop when the engine should come back for a new job (see ``_job``).
        self._interrupt = threading.Event()
        self.engine_stats = EngineStats(active_sequences=0, prefilling_sequences=0, cache_bytes=0)
        self.counters = Counters()
        self.steps = 0
        self._faults = FaultTracker(config.faults)
        self._embeddings = EmbeddingRequests(max_requests=config.max_queue)

    # ---- used by pipelines (all non-blocking) ----

    def next_id(self) -> int:
        return next(self._ids)

    def reply_channel(
        self, max_tokens: int
    ) -> tuple[trio.MemorySendChannel[Reply], trio.MemoryReceiveChannel[Reply]]:
        # One event per prefill chunk and per token, plus the end marker: never full.
        return trio.open_memory_channel[Reply](max_tokens + 2 * 1024 + 4)

    def submit_nowait(self, *submissions: Submission) -> None:
        """Queue sequences, all or none (the choices of one request); ``trio.WouldBlock``
        when the queue is full, ``CacheBudgetError`` when one could never fit in the KV-cache
        budget."""
        try:
            self._policy.enqueue_all([(s.request, s) for s in submissions])
        except QueueFull:
            raise trio.WouldBlock from None
        self.counters.requests += len(submissions)
        self._wake()

    async def embed(
        self,
        inputs: tuple[tuple[int, ...], ...],
        *,
        normalize: bool,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """One vector per input, computed on the engine thread between generation steps.

        ``trio.WouldBlock`` when ``max_queue`` embedding requests wait already; the engine's
        input errors as they are; other failures as ``GenerationError``; ``UnavailableError``
        when the server stops first. A caller cancelled leaves at once (its chunks waiting
        are dropped).
        """
        work = EmbeddingWork(inputs=inputs, normalize=normalize, dimensions=dimensions)
        self._embeddings.submit(work)
        self._wake()
        return await self._embeddings.result(work)

    @property
    def queued_embeddings(self) -> int:
        return len(self._embeddings)

    def cancel(self, seq_id: int) -> None:
        """The requester left: free its queue slot now, or drop its sequence before the next
        step."""
        running = self._policy.payload(seq_id)
        queued = self._policy.withdraw(seq_id)
        if queued is not None:
            queued.reply.close()
        elif running is not None:
            running.reply.close()  # nothing more is routed to a requester that left
            self.counters.cancelled += 1
        self._wake()

    def taken(self, seq_id: int, tokens: int) -> None:
        """The requester's reader took ``tokens`` more tokens of the sequence."""
        if self._policy.consume(seq_id, tokens):
            self._wake()  # a paused sequence may go on

    def refuse_queued(self, reason: str) -> None:
        """Admit nothing more: every queued request ends now, never admitted."""
        for sub in self._policy.withdraw_queued():
            self._end(sub, Dropped(reason, admitted=False))
        self._embeddings.fail_all(UnavailableError(reason, state="shutting_down"))

    def cancel_all(self, reason: str) -> None:
        """End every queued and running sequence now (their requesters get ``Dropped``)."""
        self.refuse_queued(reason)
        for sub in self._policy.withdraw_all():
            self._end(sub, Dropped(reason))
        self._wake()

    async def wait_settled(self) -> None:
        """Until the engine has removed every sequence that ended (``withdrawn`` is empty)."""
        while self._policy.withdrawn:
            self._wake()
            await self._job_done.wait()

    @property
    def withdrawn(self) -> frozenset[int]:
        """Sequences that ended and that the engine has yet to remove."""
        return self._policy.withdrawn

    @property
    def queued(self) -> int:
        return self._policy.queued

    @property
    def active(self) -> int:
        return self._policy.active

    @property
    def paused(self) -> int:
        return self._policy.paused

    @property
    def prefix_counters(self) -> PrefixCounters:
        return self._policy.prefixes.counters

    @property
    def prefix_entries(self) -> int:
        return len(self._policy.prefixes)

    def _wake(self) -> None:
        self._wakeup.set()
        self._interrupt.set()

    # ---- the actor ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._loop()
        except trio.Cancelled:
            # The tree is stopping: open work is cut short, not failed.
            self.cancel_all("the server stopped")
            await self._remove_withdrawn()
            raise
        except BaseException as exc:
            # Open requests learn why instead of hanging; then the tree comes down.
            failure = exc if isinstance(exc, Exception) else RuntimeError("scheduler stopped")
            for sub in self._policy.withdraw_all():
                self._end(sub, EngineFailed(failure))
            self._embeddings.fail_all(GenerationError("the server failed: internal error"))
            raise

    async def _remove_withdrawn(self) -> None:
        """The tree is stopping: have the engine remove what ended, so nothing is left
        withdrawn (bounded: the engine thread finished its last job before we got here)."""
        with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_SECONDS):
            job = self._policy.next_job(trio.current_time())
            try:
                kept = await self._thread.run(removals_only, self._engine, job)
            except Exception:  # the tree is stopping anyway; the engine's close frees it all
                log.exception("removing the last sequences failed")
                return
            self._policy.job_done(job, kept)

    async def _loop(self) -> None:
        busy = False
        token = trio.lowlevel.current_trio_token()
        while True:
            for stalled in self._policy.stalled(trio.current_time()):
                self._end(stalled, Dropped("its client stopped reading"))
            self._interrupt.clear()  # before planning: what comes after it interrupts the job
            job = self._policy.next_job(trio.current_time())
            for request in job.admits:
                self.counters.prompt_tokens += len(request.prompt)
            chunk = self._embeddings.next_chunk()
            if not job and not busy and chunk is None:
                self._wakeup = trio.Event()
                deadline = self._policy.next_deadline()
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await self._wakeup.wait()
                continue
            # While embedding chunks wait, a job runs one step: they interleave.
            limit = 1 if len(self._embeddings) else STEPS_PER_JOB
            outcome = await self._thread.run(
                self._job, job, token, chunk, limit, interrupt=self._interrupt
            )
            self._embeddings.job_returned()
            self.steps += 1
            self.engine_stats, busy = outcome.stats, outcome.busy
            rejected = {seq_id: error for seq_id, error in outcome.rejected}
            for request in job.admits:
                error = rejected.get(request.seq_id)
                if error is not None:
                    sub = self._policy.payload(request.seq_id)
                    if sub is not None:
                        self._end(sub, EngineFailed(error, admission=True))
            self._policy.job_done(job, outcome.kept, list(rejected))
            self._job_done.set()
            self._job_done = trio.Event()
            self._route(outcome.events)
            fault = None if chunk is None else self._embeddings.finish(chunk, outcome.embedded)
            if fault is not None:
                if is_out_of_memory(fault):
                    self._policy.evict_all()
                self._count_fault(fault)
            self._judge(outcome)
            await trio.lowlevel.checkpoint()

    def _job(
        self,
        job: Job,
        token: trio.lowlevel.TrioToken,
        chunk: EmbedChunk[EmbeddingWork] | None,
        limit: int,
    ) -> JobOutcome:
        """``engine_jobs.run_job`` on the engine thread; each step's events but the last are
        posted to the loop (``_deliver``) without waiting for it."""

        def post(events: list[TokenEvent], stats: EngineStats) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._deliver, events, stats)

        return run_job(self._engine, job, chunk, limit, interrupted=self._interrupt, post=post)

    def _judge(self, outcome: JobOutcome) -> None:
        """Hold a job's faults against ``FaultRule``, in the order they happened: admissions,
        then steps. Raises ``EngineFaultError`` once the rule says the engine is broken."""
        for seq_id, error in outcome.rejected:
            if not isinstance(error, ValueError | RuntimeInputError):
                log.error("the engine failed to admit sequence %d", seq_id, exc_info=error)
                if is_out_of_memory(error):
                    self._policy.evict_all()
                self._count_fault(error)
        self._faults.succeeded(outcome.steps)
        if outcome.failure is not None:
            self._fail_step(outcome.failure)

    def _fail_step(self, failure: StepFailure) -> None:
        error, abort = failure.error, failure.abort
        out_of_memory = is_out_of_memory(error)
        log.error(
            "an engine step failed; %d sequence(s) failed with it%s",
            len(abort.failed),
            ", the prefix cache is emptied (out of memory)" if out_of_memory else "",
            exc_info=error,
        )
        for seq_id in abort.failed:
            sub = self._policy.payload(seq_id)
            if sub is not None:
                self._end(sub, EngineFailed(error))
        self._policy.step_failed(abort.failed, abort.lost_entries)
        if out_of_memory:
            self._policy.evict_all()
        self._count_fault(error)

    def _count_fault(self, error: BaseException) -> None:
        self.counters.engine_faults += 1
        verdict = self._faults.failed()
        if verdict is not None:
            fault = EngineFaultError(
                f"the engine keeps failing ({verdict}; the last: {type(error).__name__}: "
                f"{error}); stopping"
            )
            log.critical("%s", fault)
            raise fault from error

    def _deliver(self, events: list[TokenEvent], stats: EngineStats) -> None:
        """The events of a step inside a job (runs in the loop, in step order)."""
        self.engine_stats = stats
        self.steps += 1
        self._route(events)

    def _route(self, events: list[TokenEvent]) -> None:
        for event in events:
            sub = self._policy.payload(event.seq_id)
            if sub is None:
                continue  # departed while the step ran; removed in the next job
            if self._policy.record(event):
                self._interrupt.set()  # its reader lags: the next job pauses it
            if event.token is not None:
                self.counters.generated_tokens += 1
            self.counters.prefilled_tokens += event.prefilled
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
                sub.reply.close()
                self._interrupt.set()  # its row is removed (and maybe saved) by the next job

    def _end(self, sub: Submission, marker: Dropped | EngineFailed) -> None:
        if isinstance(marker, Dropped):
            self.counters.cancelled += 1
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock
        ):
            sub.reply.send_nowait(marker)
        sub.reply.close()
