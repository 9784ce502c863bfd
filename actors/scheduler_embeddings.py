"""The scheduler's embedding requests: their queue, the one the engine computes, their results.

Embeddings queue apart from generations (``runtime.scheduling.embeddings.EmbeddingQueue``, at
most ``max_queue`` requests). A requester queues its ``EmbeddingWork`` with ``submit`` and
awaits ``result``; the scheduler actor (``actors.scheduler``) takes one chunk per engine job
with ``next_chunk`` and gives what came of it to ``finish``: the chunk's vectors go to their
request, which is done after its last chunk. An input the engine refused fails only that
request, with the engine's error; any other failure fails it with a generic error (or an
``OutOfMemoryError``) and is handed back to the scheduler, which counts it as an engine fault.
On shutdown or a scheduler failure ``fail_all`` ends every request queued or computing.
"""

from __future__ import annotations

import logging

import trio

from actors.engine_jobs import Embedded
from actors.messages import GenerationError, OutOfMemoryError
from actors.scheduler_records import EmbeddingWork
from runtime.errors import RuntimeInputError
from runtime.scheduling.embeddings import EmbedChunk, EmbeddingQueue, EmbeddingQueueFull
from runtime.scheduling.faults import is_out_of_memory

log = logging.getLogger("mlxrunner.scheduler")


class EmbeddingRequests:
    """The embedding requests queued, and the one whose chunk the engine job computes."""

    def __init__(self, *, max_requests: int) -> None:
        self._queue = EmbeddingQueue[EmbeddingWork](max_requests=max_requests)
        self._computing: EmbeddingWork | None = None  # the one whose chunk the engine runs

    def __len__(self) -> int:
        """The requests with chunks still to compute."""
        return len(self._queue)

    # ---- used by requesters ----

    def submit(self, work: EmbeddingWork) -> None:
        """Queue ``work``; ``trio.WouldBlock`` when ``max_requests`` requests wait already."""
        try:
            self._queue.push(work, [len(t) for t in work.inputs])
        except EmbeddingQueueFull:
            raise trio.WouldBlock from None

    async def result(self, work: EmbeddingWork) -> list[list[float]]:
        """``work``'s vectors once its last chunk is computed, or the error it failed with. A
        caller cancelled leaves at once (its chunks waiting are dropped)."""
        try:
            await work.done.wait()
        finally:
            self._queue.withdraw(work)
        if work.error is not None:
            raise work.error
        return work.vectors

    # ---- used by the scheduler's loop ----

    def next_chunk(self) -> EmbedChunk[EmbeddingWork] | None:
        """The chunk the next engine job computes (its request is computing until
        ``job_returned``), or ``None``."""
        chunk = self._queue.pop()
        self._computing = chunk.key if chunk is not None else None
        return chunk

    def job_returned(self) -> None:
        """The engine job that computed the chunk returned: no request is computing."""
        self._computing = None

    def finish(self, chunk: EmbedChunk[EmbeddingWork], result: Embedded) -> Exception | None:
        """Hand a chunk's vectors to its request (done after its last chunk), or its error.

        Returns the engine fault for the scheduler to count (a failure other than an input the
        engine refused), or ``None``.
        """
        work = chunk.key
        if isinstance(result, Exception):
            self._queue.withdraw(work)
            if isinstance(result, ValueError | RuntimeInputError):
                work.fail(result)
                return None
            log.error("the engine failed to compute embeddings", exc_info=result)
            if is_out_of_memory(result):
                work.fail(OutOfMemoryError("embedding failed: the server ran out of memory"))
            else:
                work.fail(GenerationError("embedding failed: internal error"))
            return result
        for i, vector in zip(chunk.indices, result or (), strict=True):
            work.vectors[i] = vector
        if chunk.last and not work.done.is_set():
            work.done.set()
        return None

    def fail_all(self, error: BaseException) -> None:
        """End every request queued or computing with ``error``."""
        for work in self._queue.withdraw_all():
            work.fail(error)
        if self._computing is not None:
            self._computing.fail(error)
