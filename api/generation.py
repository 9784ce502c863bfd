"""The bridge between one ``RunnerClient.generate`` context and one HTTP response.

Admission errors must become a status code before any header is sent, but a streamed body is
iterated after the handler returns, outside the request context, and Trio forbids yielding
from an async generator while a cancel scope or nursery it entered is open. So the generation
context is entered by a small pump task in the app's nursery: ``open_generation`` waits until
the runner admitted the request (errors raise here, in the handler), then the response iterates
a ``Generation`` that only receives from a channel.

``Generation.close()`` is synchronous (cancel the pump, close the channel) so it is safe in the
``finally`` of a cancelled handler or of a body generator that sees ``Cancelled`` or
``GeneratorExit`` on client disconnect; the pump then leaves the runner's context, which frees
the sequence within one engine step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import attrs
import trio

from actors.messages import Chunk, DoneReason, GenerateRequest, Logprob
from api.context import ApiContext
from api.errors import GenerationFailed

log = logging.getLogger(__name__)


@attrs.frozen
class _Failed:
    """A runner error after admission, carried to the response to end the stream."""

    error: BaseException


@attrs.define
class _Admission:
    """The pump's answer to ``open_generation``: admitted, or the error that refused it."""

    event: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None


async def _pump(
    ctx: ApiContext,
    request: GenerateRequest,
    send: trio.MemorySendChannel[Chunk | _Failed],
    scope: trio.CancelScope,
    admission: _Admission,
) -> None:
    # A plain child of the app nursery from the start (start_soon and an event rather than
    # nursery.start()), so no task_status.started() runs inside the runner's own nursery.
    with scope, send:
        try:
            async with ctx.client.generate(request) as chunks:
                admission.event.set()
                async for chunk in chunks:
                    await send.send(chunk)
                    if chunk.done:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the response went away; leaving the context told the runner
        except Exception as exc:
            if not admission.event.is_set():
                admission.error = exc
                admission.event.set()
                return
            log.exception("generation failed after admission")
            # If the response is gone already there is nobody left to tell.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send(_Failed(exc))


async def open_generation(ctx: ApiContext, request: GenerateRequest) -> Generation:
    """Admit ``request`` (raising request errors here) and return its chunk iterator."""
    ctx.check_admitting()
    nursery: trio.Nursery = _app_nursery()
    # Unbuffered: the runner's stream paces with the client's reads.
    send, receive = trio.open_memory_channel[Chunk | _Failed](0)
    scope = trio.CancelScope()
    admission = _Admission()
    started_at = trio.current_time()
    nursery.start_soon(_pump, ctx, request, send, scope, admission)
    try:
        await admission.event.wait()
    except BaseException:  # cancelled while queued (client gone): withdraw the request
        scope.cancel()
        receive.close()
        raise
    if admission.error is not None:
        receive.close()
        raise _unwrap(admission.error)
    return Generation(ctx, receive, scope, started_at)


def _unwrap(error: BaseException) -> BaseException:
    """A lone error out of the runner's nursery, without its group."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _app_nursery() -> trio.Nursery:
    from quart import current_app

    nursery: trio.Nursery = current_app.nursery  # type: ignore[attr-defined]
    return nursery


class Generation:
    """Chunks of one admitted generation; ends with exactly one ``done`` chunk."""

    def __init__(
        self,
        ctx: ApiContext,
        receive: trio.MemoryReceiveChannel[Chunk | _Failed],
        scope: trio.CancelScope,
        started_at: float,
    ) -> None:
        self._metrics = ctx.metrics
        self._token = trio.lowlevel.current_trio_token()
        self._receive = receive
        self._scope = scope
        self._last = started_at
        self._first = True
        self._finished = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            # The runner ended the stream without a final chunk: report it as cancelled.
            item = Chunk(done=True, done_reason=DoneReason.CANCELLED)
        if isinstance(item, _Failed):
            self._finished = True
            self.close()
            error = _unwrap(item.error)
            raise GenerationFailed(str(error) or type(error).__name__)
        self._observe(item)
        return item

    async def collect(self) -> Chunk:
        """Read the whole generation (non-streaming replies): one chunk with all the text,
        tokens and logprobs, and the totals of the last chunk."""
        content: list[str] = []
        tokens: list[int] = []
        logprobs: list[Logprob] = []
        last = Chunk(done=True, done_reason=DoneReason.CANCELLED)
        try:
            async for chunk in self:
                content.append(chunk.content)
                tokens.extend(chunk.tokens)
                logprobs.extend(chunk.logprobs)
                last = chunk
        finally:
            self.close()
        return attrs.evolve(
            last,
            content="".join(content),
            tokens=tuple(tokens),
            logprobs=tuple(logprobs),
            done=True,
        )

    def _observe(self, chunk: Chunk) -> None:
        m = self._metrics
        if chunk.tokens:
            now = trio.current_time()
            if self._first:
                m.ttft.observe(now - self._last)
                self._first = False
            else:
                per_token = (now - self._last) / len(chunk.tokens)
                for _ in chunk.tokens:
                    m.token_latency.observe(per_token)
            self._last = now
            m.generated_tokens.inc(len(chunk.tokens))
        if chunk.done:
            self._finished = True
            m.prompt_tokens.inc(chunk.prompt_eval_count)
            if chunk.done_reason == DoneReason.CANCELLED:
                m.cancellations.inc()
            self.close()

    def close(self) -> None:
        """Leave the generation now (idempotent, never blocks, safe while cancelled)."""
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self._finished = True
            self._metrics.cancellations.inc()
        self._scope.cancel()
        self._receive.close()

    def __del__(self) -> None:
        # Safety net: a response dropped before its body was iterated never calls close().
        # The collector may run this on any thread, so the loop does the closing.
        if self._closed:
            return
        scope, receive = self._scope, self._receive

        def close() -> None:
            scope.cancel()
            receive.close()

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(close)


class StreamBody:
    """A response body over rendered pieces that closes its generation however it ends.

    Quart's ``IterableBody`` calls ``aclose()`` when the response loop ends or is cancelled;
    closing the generation first (synchronously) means a client that goes away frees its
    sequence even if the body was never iterated.
    """

    def __init__(self, generation: Generation, pieces: AsyncIterator[bytes]) -> None:
        self._generation = generation
        self._pieces = pieces

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        self._generation.close()
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()
