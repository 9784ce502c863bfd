"""The contract between the scheduler actor and the code that runs the model.

An ``Engine`` is driven from one thread only (the engine thread); it is synchronous and knows
nothing of Trio. The scheduler adds sequences, calls ``step`` in a loop and removes sequences
that finished or whose requester is gone, and pauses sequences whose reader lags; between
steps it may also run a chunk of embeddings (``embed``). One ``step`` advances every active sequence together:
a prefill chunk for sequences still reading their prompt (bounded by a per-step token budget),
one decode token for the others. Sequences join and leave between steps. An engine may pipeline:
the events a step returns can belong to the forward pass dispatched by the step before. When
``step`` raises, the scheduler calls ``abort_step`` next: the sequences that step was computing
are dropped (their requesters get the error), and the engine goes on.

``runtime.engine.model_engine.ModelEngine`` implements it on a real model; ``actors.testing`` has a
scripted fake with the same behaviour for actor tests.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from runtime.engine.options import SamplingOptions

if TYPE_CHECKING:
    from runtime.text.structured import Constraint


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token (not emitted as text)
    LENGTH = "length"  # max_tokens reached, or the context is full


@attrs.frozen(kw_only=True)
class PrefixReuse:
    """Start a sequence from the first ``length`` positions of prefix-cache entry ``entry_id``."""

    entry_id: int
    length: int


@attrs.frozen(kw_only=True)
class SequenceRequest:
    """A sequence to generate. ``max_tokens`` is already clamped to the context.

    ``logit_bias`` (token id, value) pairs are added to the raw logits before sampling; the
    logprobs reported are those of the biased logits (before penalties), as OpenAI's are.

    ``share_prompt_of`` names a running sequence with the same prompt (a sibling choice of
    OpenAI's ``n``): this one computes nothing of its prompt until that one's is computed, then
    copies its positions but the last (see ``ModelEngine``); if the sibling is gone first, it
    computes its prompt itself.

    ``constraint`` (structured output) limits every token drawn to those its grammar allows
    after the tokens drawn before; the sequence starts its own matcher from it.
    """

    seq_id: int
    prompt: tuple[int, ...]
    sampling: SamplingOptions
    max_tokens: int
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    reuse: PrefixReuse | None = None
    share_prompt_of: int | None = None
    constraint: Constraint | None = None


@attrs.frozen(kw_only=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@attrs.frozen(kw_only=True)
class TokenEvent:
    """What one step produced for one sequence.

    ``token`` is ``None`` for a step that only advanced the prompt (``prefilled`` tokens).
    After ``finish`` the sequence computes nothing more but keeps its cache row until
    ``remove`` (which may keep its positions as a prefix-cache entry); an EOS token that ends a
    sequence is reported with ``finish=STOP`` and must not be shown.
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
    cache_bytes: int  # everything the KV cache holds: the batch and the prefix entries
    prefix_bytes: int = 0
    capacity_rows: int = 0
    capacity_positions: int = 0


@attrs.frozen(kw_only=True)
class StepAbort:
    """What a failed step cost: the sequences dropped with it, and lost prefix-cache entries."""

    failed: tuple[int, ...]
    lost_entries: tuple[int, ...] = ()


class Engine(Protocol):
    """A model runner advanced one batched step at a time (engine thread only)."""

    @property
    def context_length(self) -> int: ...

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one position of one sequence takes (all layers, keys and values)."""

    def add(self, request: SequenceRequest) -> None:
        """Admit a sequence; it starts prefilling at the next ``step`` (after ``reuse``)."""

    def remove(self, seq_id: int, *, save_as: int | None = None) -> int:
        """Drop a sequence and free its row. With ``save_as``, first keep its computed positions
        as prefix-cache entry ``save_as`` (only once its prompt was fully computed); returns how
        many were kept. Unknown ids are ignored (0)."""

    def drop_prefix(self, entry_id: int) -> None:
        """Free a prefix-cache entry. Unknown ids are ignored."""

    def set_paused(self, seq_id: int, paused: bool) -> None:
        """Stop (or restart) decoding a sequence: a paused one keeps its row and cache but
        computes no token until it is unpaused; the other rows step on without it. A token
        already in flight for it is still reported. Unknown ids are ignored."""

    def has_work(self) -> bool:
        """Whether ``step`` would advance anything."""

    def step(self) -> list[TokenEvent]:
        """Advance every active sequence by one step; return one event per sequence advanced.

        If it raises, the caller must call ``abort_step`` before anything else."""

    def abort_step(self) -> StepAbort:
        """After ``step`` raised (or its events were lost): drop the sequences that step was
        computing, freeing their rows (nothing of theirs becomes a prefix entry), and discard
        any pipelined work. What the step did not touch stays usable unless it may depend on
        what failed (a failed evaluation can spoil every array it reached): then it is
        dropped too. Returns every sequence and prefix entry dropped."""

    def embed(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        normalize: bool,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """One pooled float32 vector per input (``runtime.engine.embedding``), computed apart
        from the sequences: their cache rows and the prefix cache are not touched. Raises
        ``PromptError`` for an input the model cannot take."""

    def statistics(self) -> EngineStats: ...

    def close(self) -> None:
        """Release the model and every cache (engine thread, once, at shutdown)."""
