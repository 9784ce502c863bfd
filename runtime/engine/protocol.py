"""The contract between the scheduler actor and the code that runs the model.

An ``Engine`` is driven from one thread only (the engine thread); it is synchronous and knows
nothing of Trio. The scheduler adds sequences, calls ``step`` in a loop and removes sequences
whose requester is gone. One ``step`` advances every active sequence together: a prefill chunk
for sequences still reading their prompt (bounded by a per-step token budget), one decode token
for the others. Sequences join and leave between steps.

``runtime.engine.model_engine.ModelEngine`` implements it on a real model; ``actors.testing`` has a
scripted fake with the same behaviour for actor tests.
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs

from runtime.engine.options import SamplingOptions


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token (not emitted as text)
    LENGTH = "length"  # max_tokens reached, or the context is full


@attrs.frozen(kw_only=True)
class SequenceRequest:
    """A sequence to generate. ``max_tokens`` is already clamped to the context."""

    seq_id: int
    prompt: tuple[int, ...]
    sampling: SamplingOptions
    max_tokens: int
    logprobs: bool = False
    top_logprobs: int = 0


@attrs.frozen(kw_only=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@attrs.frozen(kw_only=True)
class TokenEvent:
    """What one step produced for one sequence.

    ``token`` is ``None`` for a step that only advanced the prompt (``prefilled`` tokens).
    When ``finish`` is set the engine has already dropped the sequence and its cache; an EOS
    token that ends a sequence is reported with ``finish=STOP`` and must not be shown.
    """

    seq_id: int
    token: int | None
    prefilled: int = 0
    logprob: TokenLogprob | None = None
    finish: FinishReason | None = None


@attrs.frozen(kw_only=True)
class EngineStats:
    active_sequences: int
    prefilling_sequences: int
    cache_bytes: int


class Engine(Protocol):
    """A model runner advanced one batched step at a time (engine thread only)."""

    @property
    def context_length(self) -> int: ...

    def add(self, request: SequenceRequest) -> None:
        """Admit a sequence; it starts prefilling at the next ``step``."""

    def remove(self, seq_id: int) -> None:
        """Drop a sequence and free its cache now. Unknown ids are ignored."""

    def has_work(self) -> bool:
        """Whether ``step`` would advance anything."""

    def step(self) -> list[TokenEvent]:
        """Advance every active sequence by one step; return one event per sequence advanced."""

    def statistics(self) -> EngineStats: ...
