"""How a route holds one generation: admitted before any header, then read to its end.

``open_generation`` asks the runner to admit the request. Its errors raise in the handler,
before a header is sent, so ``api/errors.py`` turns them into 4xx, 429 or 503. The route then
reads the ``GenerationReader`` it returns: a streamed body iterates it as the response is
sent, a whole reply calls ``collect``. The reader receives straight from the handle's channel
(no task or channel of its own), records the metrics, and closes the handle when the last item
is read or the response goes away (``StreamBody.aclose``, or the handler's cancellation).

A generation ends in exactly one of two ways: a done chunk (it finished: stop or length), or a
``GenerationError`` raised by the reader (``GenerationCut`` when it was cut short or never
admitted). Routes map the latter through ``api/errors.py``: a status for a whole reply, an
error record at the end of a stream. Nothing cut is ever rendered as finished.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import attrs
import trio

from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    Generation,
    GenerationCut,
    GenerationError,
    Logprob,
)
from api.context import ApiContext
from api.errors import request_id
from api.metrics import Metrics


async def open_generation(ctx: ApiContext, request: GenerateRequest) -> GenerationReader:
    """Admit ``request`` (its request errors raise here) and return its reader."""
    ctx.check_admitting()
    started_at = trio.current_time()
    generation = await ctx.client.submit(request)
    return GenerationReader(ctx.metrics, generation, started_at, request_id=request_id())


class GenerationReader:
    """The chunks of one admitted generation, ending in exactly one ``done`` chunk.

    A generation that failed after admission raises its ``GenerationError`` instead of the
    last chunk; a cut one its ``GenerationCut``, and so does a channel that just ends (the
    tree stopped). Every done chunk it returns is a finished generation. ``request_id`` is the
    HTTP request's, for the error record that ends a failed stream (the response is sent after
    the request's context is gone).
    """

    def __init__(
        self,
        metrics: Metrics,
        generation: Generation,
        started_at: float,
        *,
        request_id: str,
        counts_prompt: bool = True,
    ) -> None:
        # False for the other choices of one request (OpenAI's n): their prompt is the first's.
        self._counts_prompt = counts_prompt
        self.request_id = request_id
        self._metrics = metrics
        self._generation = generation
        self._last = started_at
        self._first = True
        self._finished = False

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._generation.chunks.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            item = GenerationCut("the server stopped before the generation finished")
        if isinstance(item, Chunk) and item.done and item.done_reason is DoneReason.CANCELLED:
            item = GenerationCut("the generation was cancelled", item)  # never a success
        if isinstance(item, GenerationError):
            self._finished = True
            if isinstance(item, GenerationCut):
                self._metrics.cancellations.inc()
                if self._counts_prompt:
                    self._metrics.prompt_tokens.inc(item.final.prompt_eval_count)
            self._generation.close()
            raise item
        self._observe(item)
        return item

    async def collect(self) -> Chunk:
        """Read the whole generation (non-streaming replies): one chunk with all the text,
        tokens and logprobs, and the totals of the last chunk. A cut or failed generation
        raises (the route answers 503 or 500, never the partial text as a success)."""
        content: list[str] = []
        thinking: list[str] = []
        tokens: list[int] = []
        logprobs: list[Logprob] = []
        last = Chunk(done=True)
        try:
            async for chunk in self:
                content.append(chunk.content)
                thinking.append(chunk.thinking)
                tokens.extend(chunk.tokens)
                logprobs.extend(chunk.logprobs)
                last = chunk
        finally:
            self.close()
        return attrs.evolve(
            last,
            content="".join(content),
            thinking="".join(thinking),
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
            if self._counts_prompt:
                m.prompt_tokens.inc(chunk.prompt_eval_count)
            self._generation.close()

    def close(self) -> None:
        """Leave the generation now (idempotent, never blocks, safe while cancelled)."""
        if not self._finished:
            self._finished = True
            self._metrics.cancellations.inc()
        self._generation.close()


class Closable(Protocol):
    def close(self) -> None: ...


class StreamBody:
    """A response body over rendered pieces that closes its generation however it ends.

    Quart's ``IterableBody`` calls ``aclose()`` when the response loop ends or is cancelled;
    closing the generation first (synchronously) means a client that goes away frees its
    sequence even if the body was never iterated.
    """

    def __init__(self, reader: Closable, pieces: AsyncIterator[bytes]) -> None:
        self._reader = reader
        self._pieces = pieces

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        self._reader.close()
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()
