"""``Runner``: the actor tree's client, what the HTTP layer and ``mlxrunner run`` talk to.

It holds the tree's shared state (loading progress, readiness, shutdown) and implements the
``RunnerClient`` protocol. ``generate`` admits a request (validation and queue errors raise at
once), starts the request's pipeline task and yields its chunk channel; leaving the context,
for whatever reason, tells the scheduler to drop the sequence.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from actors import pipeline
from actors.messages import (
    Chunk,
    GenerateRequest,
    Health,
    ModelInfo,
    QueueFullError,
    Statistics,
    UnavailableError,
)
from actors.scheduler import Submission
from runtime.engine.protocol import SequenceRequest
from runtime.errors import exception_leaves

if TYPE_CHECKING:
    from actors.scheduler import Scheduler
    from runtime.text.tokenizer import Tokenizer


@attrs.frozen(kw_only=True)
class Ready:
    scheduler: Scheduler
    tokenizer: Tokenizer
    info: ModelInfo


class Runner:
    def __init__(self) -> None:
        self.progress = 0.0  # written by the engine thread while loading (a float store is atomic)
        self.ready: Ready | None = None
        self.state: Literal["loading", "ok", "shutting_down"] = "loading"
        self.stopped = trio.Event()  # the tree asks the HTTP server to stop
        self._open = 0
        self._idle = trio.Event()
        self._idle.set()
        self._ready_event = trio.Event()

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
        """Until no generation is open."""
        await self._idle.wait()

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
            return Statistics(active_sequences=0, queued_requests=0, cache_bytes=0)
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
            generated_tokens_total=c.generated_tokens,
            cache_hits_total=p.hits,
            cache_lookups_total=p.lookups,
            cache_reused_tokens_total=p.reused_tokens,
            cache_evictions_total=p.evictions,
            prefix_cache_bytes=s.engine_stats.prefix_bytes,
            prefix_cache_entries=s.prefix_entries,
        )

    def model_info(self) -> ModelInfo:
        return self._require().info

    def tokenize(self, text: str) -> list[int]:
        return self._require().tokenizer.encode(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self._require().tokenizer.decode(tokens)

    @asynccontextmanager
    async def generate(
        self, request: GenerateRequest
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Chunk]]:
        ready = self._require()
        scheduler = ready.scheduler
        prepared = pipeline.prepare(request, ready.tokenizer, ready.info.context_length)
        submitted = time.monotonic_ns()
        if prepared.max_tokens == 0:
            yield _finished(prepared, submitted)
            return
        seq_id = scheduler.next_id()
        reply_send, reply_receive = scheduler.reply_channel(prepared.max_tokens)
        submission = Submission(
            request=SequenceRequest(
                seq_id=seq_id,
                prompt=prepared.prompt,
                sampling=request.options.sampling,
                max_tokens=prepared.max_tokens,
                logprobs=request.logprobs or request.top_logprobs > 0,
                top_logprobs=request.top_logprobs,
            ),
            reply=reply_send,
        )
        try:
            scheduler.submit_nowait(submission)
        except trio.WouldBlock:
            raise QueueFullError(
                f"the request queue is full ({scheduler.config.max_queue} waiting)"
            ) from None
        chunk_send, chunk_receive = trio.open_memory_channel[Chunk](1)
        failure: list[pipeline.EngineFailure] = []
        self._open += 1
        self._idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _run_pipeline,
                    prepared,
                    request,
                    ready.tokenizer,
                    reply_receive,
                    chunk_send,
                    submitted,
                    failure,
                )
                try:
                    yield chunk_receive
                finally:
                    nursery.cancel_scope.cancel()
            if failure:
                raise failure[0]
        except BaseExceptionGroup as group:
            # Surface the pipeline's own error (e.g. EngineFailure) rather than a group.
            leaves = exception_leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
        finally:
            scheduler.cancel(seq_id)  # a no-op once the sequence has finished
            reply_receive.close()
            self._open -= 1
            if self._open == 0:
                self._idle.set()


async def _run_pipeline(
    prepared: pipeline.Prepared,
    request: GenerateRequest,
    tokenizer: Tokenizer,
    replies: trio.MemoryReceiveChannel[pipeline.Reply],
    chunks: trio.MemorySendChannel[Chunk],
    submitted: int,
    failure: list[pipeline.EngineFailure],
) -> None:
    try:
        await pipeline.stream(prepared, request, tokenizer, replies, chunks, submitted_ns=submitted)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the consumer left; the scheduler has been told
    except pipeline.EngineFailure as exc:
        # Kept for ``generate`` to raise when its body ends: the consumer sees the channel
        # close and then this error, whichever way the cancellation races go.
        failure.append(exc)


def _finished(prepared: pipeline.Prepared, submitted: int) -> trio.MemoryReceiveChannel[Chunk]:
    from actors.messages import DoneReason

    send, receive = trio.open_memory_channel[Chunk](1)
    send.send_nowait(
        Chunk(
            done=True,
            done_reason=DoneReason.LENGTH,
            prompt_eval_count=len(prepared.prompt),
            total_duration=time.monotonic_ns() - submitted,
        )
    )
    send.close()
    return receive
