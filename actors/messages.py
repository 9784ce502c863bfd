"""Records exchanged between the HTTP layer, the pipelines and the scheduler.

The HTTP layer (``api/``) only ever sees these records and the ``RunnerClient`` protocol;
everything else in ``actors/`` is private to the actor tree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import attrs
import trio

from runtime.engine.options import SamplingOptions
from runtime.errors import RuntimeInputError


class DoneReason(enum.IntEnum):
    """Why a generation ended; the integers are the native wire values (as Ollama's runner)."""

    STOP = 0  # end-of-sequence token or a stop string
    LENGTH = 1  # num_predict or the context length reached
    CANCELLED = 2  # the client went away, or shutdown cancelled it


# ---- request errors (mapped to HTTP statuses in api/errors.py) ----


class QueueFullError(RuntimeInputError):
    """The bounded request queue is full (HTTP 429 with Retry-After)."""


class UnavailableError(RuntimeInputError):
    """The runner cannot take requests now: still loading, or shutting down (HTTP 503)."""

    def __init__(self, message: str, *, state: Literal["loading", "shutting_down"]) -> None:
        super().__init__(message)
        self.state = state


# ---- requests ----


@attrs.frozen(kw_only=True)
class ChatMessage:
    role: str
    content: str
    extra: Mapping[str, Any] = attrs.field(
        factory=dict
    )  # tool_calls, name, images... passed to the template


@attrs.frozen(kw_only=True)
class GenerationOptions:
    sampling: SamplingOptions = attrs.field(factory=SamplingOptions)
    num_predict: int = -1  # -1: until EOS or the context is full
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None  # None: the model's context length


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """One generation. Exactly one of ``prompt``, ``messages`` or ``tokens`` is set.

    ``prompt`` is raw text unless ``template`` is True (then it is wrapped as one user message
    with the model's chat template). ``messages`` always go through the chat template.
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tokens: tuple[int, ...] | None = None
    system: str | None = None
    template: bool = False
    tools: tuple[Mapping[str, Any], ...] | None = None
    options: GenerationOptions = attrs.field(factory=GenerationOptions)
    logprobs: bool = False
    top_logprobs: int = 0


# ---- responses ----


@attrs.frozen(kw_only=True)
class Logprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@attrs.frozen(kw_only=True)
class Chunk:
    """One piece of a streamed generation. The last chunk has ``done=True`` and the totals."""

    content: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[Logprob, ...] = ()
    done: bool = False
    done_reason: DoneReason | None = None
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns
    total_duration: int = 0  # ns, from submission to the last chunk
    load_duration: int = 0  # ns


# ---- state ----


@attrs.frozen(kw_only=True)
class Health:
    status: Literal["loading", "ok", "shutting_down"]
    progress: float = 0.0  # 0..1 while loading


@attrs.frozen(kw_only=True)
class Statistics:
    active_sequences: int
    queued_requests: int
    cache_bytes: int
    requests_total: int = 0
    cancelled_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    cache_hits_total: int = 0
    cache_lookups_total: int = 0
    cache_reused_tokens_total: int = 0
    cache_evictions_total: int = 0
    prefix_cache_bytes: int = 0  # the part of cache_bytes kept by prefix-cache entries
    prefix_cache_entries: int = 0


@attrs.frozen(kw_only=True)
class ModelInfo:
    name: str
    model_type: str
    context_length: int
    parameters: int
    quantization: str  # "F32", "Q4_0", "int4 g32", ...
    chat_template: str | None
    size_bytes: int
    digest: str
    modified_at: float  # unix time
    family: str = ""


class RunnerClient(Protocol):
    """What the HTTP layer (and ``mlxrunner run``) may ask of the actor tree."""

    def health(self) -> Health: ...

    def statistics(self) -> Statistics: ...

    def model_info(self) -> ModelInfo:
        """Raises ``UnavailableError`` while loading."""

    def tokenize(self, text: str) -> list[int]:
        """Raises ``UnavailableError`` while loading."""

    def detokenize(self, tokens: list[int]) -> str:
        """Raises ``UnavailableError`` while loading, ``OptionsError`` for unknown ids."""

    def generate(
        self, request: GenerateRequest
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Chunk]]:
        """Open a generation; iterate the channel for chunks, the last with ``done=True``.

        Validation, queue admission and prompt-length errors raise on entry (before any
        chunk): ``OptionsError``/``PromptError`` (400/413), ``QueueFullError`` (429),
        ``UnavailableError`` (503). Leaving the context early cancels the generation and frees
        its sequence within one engine step.
        """
