"""The records the scheduler actor shares with its requesters: its config, what a reply
channel carries (``Reply``: token events, then ``Dropped`` or ``EngineFailed`` when the
scheduler or the engine ended a sequence), a queued ``Submission``, the request counters, and
an embedding request's ``EmbeddingWork``.
"""

from __future__ import annotations

import attrs
import trio

from actors.messages import GenerationError, OutOfMemoryError
from runtime.engine.protocol import SequenceRequest, TokenEvent
from runtime.errors import RuntimeInputError
from runtime.scheduling.faults import FaultRule, is_out_of_memory


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    max_queue: int = 64
    parallel: int = 4
    # One budget for the batch KV cache and the prefix-cache entries together.
    cache_bytes_limit: int = 2 << 30
    prefix_cache: bool = True
    reader_pause_tokens: int = 256
    reader_timeout: float = 60.0
    faults: FaultRule = attrs.field(factory=FaultRule)

    def __attrs_post_init__(self) -> None:
        if self.max_queue < 1 or self.parallel < 1:
            raise ValueError("max_queue and parallel must be >= 1")
        if self.cache_bytes_limit < 1:
            raise ValueError("cache_bytes_limit must be >= 1")
        if self.reader_pause_tokens < 2:
            raise ValueError("reader_pause_tokens must be >= 2")


@attrs.frozen
class Dropped:
    """The last item a reply channel carries when the scheduler ended the sequence itself
    (shutdown, or a reader that stopped reading); ``admitted``: whether it ever ran."""

    reason: str
    admitted: bool = True


@attrs.frozen
class EngineFailed:
    """The last item a reply channel carries when the engine could not run the sequence.

    ``admission``: the engine refused the sequence when it was added (not a failed step).
    """

    error: BaseException
    admission: bool = False

    def generation_error(self) -> GenerationError:
        """What the requester is told. Only an input the engine refused is described; a fault
        gets a generic message (the scheduler logged its details)."""
        error = self.error
        if is_out_of_memory(error):
            failure: GenerationError = OutOfMemoryError(
                "generation failed: the server ran out of memory; try again later"
            )
        elif self.admission and isinstance(error, ValueError | RuntimeInputError):
            failure = GenerationError(f"generation failed: {error}")
        else:
            failure = GenerationError("generation failed: internal error")
        failure.__cause__ = error
        return failure


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
    prefilled_tokens: int = 0  # prompt positions the engine computed (not copied or reused)
    generated_tokens: int = 0
    engine_faults: int = 0  # failed steps and failed admissions (not input errors)


@attrs.define(eq=False)
class EmbeddingWork:
    """One embedding request: its token inputs and, once done, a vector per input."""

    inputs: tuple[tuple[int, ...], ...]
    normalize: bool
    dimensions: int | None
    vectors: list[list[float]] = attrs.field(init=False)
    done: trio.Event = attrs.field(init=False, factory=trio.Event)
    error: BaseException | None = None

    def __attrs_post_init__(self) -> None:
        self.vectors = [[] for _ in self.inputs]

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
