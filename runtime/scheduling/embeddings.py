"""The embedding queue: which chunk of which embedding request the engine computes next.

Each request's inputs are cut into chunks of at most ``chunk_tokens`` tokens
(``runtime.engine.embedding.plan_chunks``); the scheduler runs one chunk per engine job,
between generation steps, so a big batch never holds generation up for long. Requests are
served first come, first served, a chunk at a time. Plain code: the scheduler actor owns the
payloads' delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import attrs

from runtime.engine.embedding import EMBED_CHUNK_TOKENS, plan_chunks

K = TypeVar("K")


class EmbeddingQueueFull(Exception):
    pass


@attrs.frozen
class EmbedChunk(Generic[K]):
    key: K
    indices: range  # the inputs of the request this chunk computes
    last: bool  # the request's last chunk


class EmbeddingQueue(Generic[K]):
    def __init__(self, *, max_requests: int, chunk_tokens: int = EMBED_CHUNK_TOKENS) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        self.max_requests = max_requests
        self.chunk_tokens = chunk_tokens
        self._chunks: dict[K, list[range]] = {}  # insertion order: first come, first served

    def __len__(self) -> int:
        return len(self._chunks)

    def push(self, key: K, lengths: Sequence[int]) -> None:
        """Queue a request whose inputs have ``lengths`` tokens; ``EmbeddingQueueFull`` when
        ``max_requests`` are waiting."""
        if len(self._chunks) >= self.max_requests:
            raise EmbeddingQueueFull
        self._chunks[key] = plan_chunks(lengths, self.chunk_tokens) or [range(0)]

    def pop(self) -> EmbedChunk[K] | None:
        """The next chunk to compute (removed from the queue), or ``None``."""
        for key, chunks in self._chunks.items():
            indices = chunks.pop(0)
            if not chunks:
                del self._chunks[key]
            return EmbedChunk(key, indices, last=not chunks)
        return None

    def withdraw(self, key: K) -> None:
        """The requester left: drop its chunks still waiting."""
        self._chunks.pop(key, None)

    def withdraw_all(self) -> list[K]:
        keys = list(self._chunks)
        self._chunks.clear()
        return keys
