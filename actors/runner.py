"""``Runner``: the actor tree's client, what the HTTP layer and ``mlxrunner run`` talk to.

It holds the tree's shared state (loading progress, readiness, shutdown) and implements the
``RunnerClient`` protocol. It also runs the pipelines actor: the nursery, open for the life of
the tree, in which each admitted request's pipeline task runs. ``submit`` admits a request
(validation and queue errors raise at once), starts its pipeline there and returns a
``Generation`` handle; closing the handle cancels the pipeline, whose exit tells the scheduler
to drop the sequence. A request's failure reaches its handle only, as the last item.

Open generations (being admitted, queued, running, or finished but not read to the end) are
bounded by ``max_open``: beyond it ``submit`` raises ``OverloadedError`` at once. With the
scheduler's pause of sequences whose reader lags, that bounds the output the server holds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from actors import pipeline
from actors.embedding import prepare_inputs
from actors.messages import (
    Chunk,
    DoneReason,
    Embeddings,
    EmbedRequest,
    GenerateRequest,
    Generation,
    GenerationItem,
    Health,
    ModelInfo,
    OverloadedError,
    QueueFullError,
    Statistics,
    UnavailableError,
)
from actors.scheduler_records import Submission
from runtime.engine.protocol import SequenceRequest

if TYPE_CHECKING:
    from actors.scheduler import Scheduler
    from actors.scheduler_records import Reply
    from runtime.text.tokenizer import Tokenizer


@attrs.frozen(kw_only=True)
class Ready:
    scheduler: Scheduler
    tokenizer: Tokenizer
    info: ModelInfo


class Runner:
    def __init__(
        self, *, max_open: int = 256, cpu_workers: int, stream_interval: int | None = None
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        if stream_interval is not None and stream_interval < 1:
            raise ValueError("stream_interval must be >= 1 (or None: by the running streams)")
        self.stream_interval = stream_interval
        # Request-sized CPU work runs on worker threads, at most this many at once (see
        # ``RunnerClient``): a burst of long prompts queues here instead of stalling the loop.
        self.cpu_limiter = trio.CapacityLimiter(cpu_workers)
        self.progress = 0.0  # written by the engine thread while loading (a float store is atomic)
        self.ready: Ready | None = None
        self.state: Literal["loading", "ok", "shutting_down"] = "loading"
        self.stopped = trio.Event()  # the tree asks the HTTP server to stop
        self.max_open = max_open
        self._open = 0  # pipelines running
        self._preparing = 0  # requests being tokenized by ``submit``
        self._idle = trio.Event()
        self._idle.set()
        self._ready_event = trio.Event()
        self._pipelines: trio.Nursery | None = None

    # ---- tree side ----

    def set_ready(self, ready: Ready) -> None:
        self.ready = ready
        if self.state == "loading":
            self.state = "ok"
        self._ready_event.set()

    async def wait_ready(self) -> Ready:
        await self._ready_event.wait()
        assert self.ready is not None
        return self.ready

    def begin_shutdown(self) -> None:
        self.state = "shutting_down"

    async def wait_idle(self) -> None:
        """Until no pipeline runs: every generation's last item has been taken."""
        await self._idle.wait()

    async def run_pipelines(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The pipelines actor: the nursery that ``submit`` starts pipeline tasks in.

        Pipelines end with an item on their own channel, never with an exception, so this
        nursery only ever ends by being cancelled with the tree; from then on ``submit``
        answers ``UnavailableError``.
        """
        async with trio.open_nursery() as nursery:
            self._pipelines = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._pipelines = None

    async def shutdown_trigger(self) -> None:
        """For hypercorn's ``shutdown_trigger``: returns when the tree has drained."""
        await self.stopped.wait()

    # ---- RunnerClient ----

    def health(self) -> Health:
        if self.state == "shutting_down":
            return Health(status="shutting_down", progress=1.0)
        if self.ready is None:
            return Health(status="loading", progress=min(max(self.progress, 0.0), 1.0))
        return Health(status="ok", progress=1.0)

    def _require(self) -> Ready:
        if self.state == "shutting_down":
            raise UnavailableError("the server is shutting down", state="shutting_down")
        if self.ready is None:
            raise UnavailableError(f"the model is loading ({self.progress:.0%})", state="loading")
        return self.ready

    def statistics(self) -> Statistics:
        if self.ready is None:
            return Statistics(
                active_sequences=0,
                queued_requests=0,
                cache_bytes=0,
                open_generations=self._open + self._preparing,
            )
        s = self.ready.scheduler
        c = s.counters
        p = s.prefix_counters
        return Statistics(
            active_sequences=s.active,
            queued_requests=s.queued,
            cache_bytes=s.engine_stats.cache_bytes,
            requests_total=c.requests,
            cancelled_total=c.cancelled,
            prompt_tokens_total=c.prompt_tokens,
            prefilled_tokens_total=c.prefilled_tokens,
            generated_tokens_total=c.generated_tokens,
            cache_hits_total=p.hits,
            cache_lookups_total=p.lookups,
            cache_reused_tokens_total=p.reused_tokens,
            cache_evictions_total=p.evictions,
            prefix_cache_bytes=s.engine_stats.prefix_bytes,
            prefix_cache_entries=s.prefix_entries,
            paused_sequences=s.paused,
            open_generations=self._open + self._preparing,
        )

    def model_info(self) -> ModelInfo:
        return self._require().info

    async def tokenize(self, text: str) -> list[int]:
        ready = self._require()
        pipeline.check_text_fits(len(text), ready.info.context_length, ready.tokenizer)
        return await trio.to_thread.run_sync(ready.tokenizer.encode, text, limiter=self.cpu_limiter)

    async def detokenize(self, tokens: list[int]) -> str:
        ready = self._require()
        return await trio.to_thread.run_sync(
            ready.tokenizer.decode, tokens, limiter=self.cpu_limiter
        )

    async def embed(self, request: EmbedRequest) -> Embeddings:
        """Tokenize ``request``'s inputs on a worker thread, then have the scheduler compute
        them between generation steps. See ``RunnerClient.embed`` for the errors."""
        ready = self._require()
        if self._open + self._preparing >= self.max_open:
            raise OverloadedError(f"too many generations are open ({self.max_open})")
        self._preparing += 1  # counted as open work until its vectors are back
        try:
            inputs = await trio.to_thread.run_sync(
                prepare_inputs,
                request,
                ready.tokenizer,
                ready.info.context_length,
                ready.info.embedding_length,
                limiter=self.cpu_limiter,
            )
            ready = self._require()
            submitted = time.monotonic_ns()
            try:
                vectors = await ready.scheduler.embed(
                    inputs, normalize=request.normalize, dimensions=request.dimensions
                )
            except trio.WouldBlock:
                raise QueueFullError(
                    f"the embedding queue is full ({ready.scheduler.config.max_queue} waiting)"
                ) from None
        finally:
            self._preparing -= 1
        return Embeddings(
            vectors=vectors,
            prompt_tokens=sum(len(t) for t in inputs),
            total_duration=time.monotonic_ns() - submitted,
        )

    async def submit(self, request: GenerateRequest) -> Generation:
        """Admit ``request``, start its pipeline in the tree and return its handle.

        The prompt is rendered and tokenized on a worker thread behind ``cpu_limiter`` (it can
        be long), then the sequence is queued with the scheduler and its pipeline task starts
        in the pipelines nursery. See ``RunnerClient.submit`` for the errors.
        """
        (generation,) = await self.submit_choices(request, 1)
        return generation

    async def submit_choices(self, request: GenerateRequest, n: int) -> list[Generation]:
        """``RunnerClient.submit_choices``: the prompt is prepared once; the sequences after
        the first share its computed prompt (``SequenceRequest.share_prompt_of``)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ready = self._require()
        if self._open + self._preparing + n > self.max_open:
            raise OverloadedError(f"too many generations are open ({self.max_open})")
        self._preparing += 1
        try:
            prepared = await trio.to_thread.run_sync(
                pipeline.prepare,
                request,
                ready.tokenizer,
                ready.info.context_length,
                limiter=self.cpu_limiter,
            )
        finally:
            self._preparing -= 1
        ready = self._require()  # shutdown may have begun while the prompt was tokenized
        nursery = self._pipelines
        if nursery is None:
            raise UnavailableError("the server is shutting down", state="shutting_down")
        submitted = time.monotonic_ns()
        if prepared.max_tokens == 0:
            return [_finished(prepared, submitted) for _ in range(n)]
        scheduler = ready.scheduler
        sampling = request.options.sampling
        submissions: list[Submission] = []
        replies: list[trio.MemoryReceiveChannel[Reply]] = []
        for i in range(n):
            seq_id = scheduler.next_id()
            reply_send, reply_receive = scheduler.reply_channel(prepared.max_tokens)
            replies.append(reply_receive)
            seed = sampling.seed
            submissions.append(
                Submission(
                    request=SequenceRequest(
                        seq_id=seq_id,
                        prompt=prepared.prompt,
                        # Choice i draws with seed + i: distinct, and reproducible.
                        sampling=sampling
                        if seed is None or i == 0
                        else attrs.evolve(sampling, seed=seed + i),
                        max_tokens=prepared.max_tokens,
                        logprobs=request.logprobs or request.top_logprobs > 0,
                        top_logprobs=request.top_logprobs,
                        logit_bias=request.options.logit_bias,
                        share_prompt_of=submissions[0].request.seq_id if i else None,
                        constraint=prepared.constraint,
                    ),
                    reply=reply_send,
                )
            )
        try:
            scheduler.submit_nowait(*submissions)
        except trio.WouldBlock:
            raise QueueFullError(
                f"the request queue is full ({scheduler.config.max_queue} waiting)"
            ) from None
        return [
            self._start_pipeline(
                nursery, ready.tokenizer, scheduler, prepared, request, sub, replies[i], submitted
            )
            for i, sub in enumerate(submissions)
        ]

    def _start_pipeline(
        self,
        nursery: trio.Nursery,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        prepared: pipeline.Prepared,
        request: GenerateRequest,
        submission: Submission,
        replies: trio.MemoryReceiveChannel[Reply],
        submitted: int,
    ) -> Generation:
        """The pipeline of one queued sequence, and its handle."""
        seq_id = submission.request.seq_id
        # Unbuffered: the pipeline paces with its reader, and while it lives the reader has
        # not taken the last item yet (what ``wait_idle`` waits for).
        send, receive = trio.open_memory_channel[GenerationItem](0)
        scope = trio.CancelScope()
        self._open += 1
        self._idle = trio.Event()
        run = functools.partial(
            pipeline.run,
            prepared,
            request,
            tokenizer,
            replies,
            send,
            submitted_ns=submitted,
            on_taken=functools.partial(scheduler.taken, seq_id),
            gather=lambda: pipeline.chunk_tokens(self.stream_interval, scheduler.active),
        )
        nursery.start_soon(self._pipeline, run, scope, scheduler, seq_id)

        def close() -> None:
            receive.close()
            scope.cancel()
            # Now, not when the pipeline next runs: a request closed while queued must not be
            # admitted in between (its slot is free at once).
            scheduler.cancel(seq_id)

        return Generation(receive, close)

    async def _pipeline(
        self,
        run: Callable[[], Awaitable[None]],
        scope: trio.CancelScope,
        scheduler: Scheduler,
        seq_id: int,
    ) -> None:
        # ``run`` owns (and closes) the pipeline's two channels.
        try:
            with scope:
                await run()
        finally:
            # However the pipeline ended (done, failed, its handle closed, the tree
            # cancelled), the scheduler drops what is left: a no-op once the sequence ended.
            scheduler.cancel(seq_id)
            self._open -= 1
            if self._open == 0:
                self._idle.set()


def _finished(prepared: pipeline.Prepared, submitted: int) -> Generation:
    """The handle of a generation with nothing to generate (``num_predict`` 0)."""
    send, receive = trio.open_memory_channel[GenerationItem](1)
    send.send_nowait(
        Chunk(
            done=True,
            done_reason=DoneReason.LENGTH,
            prompt_eval_count=len(prepared.prompt),
            total_duration=time.monotonic_ns() - submitted,
        )
    )
    send.close()
    return Generation(receive, receive.close)
