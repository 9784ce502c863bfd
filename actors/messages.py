"""What the actor tree's clients see: requests, chunks, errors, the generation handle and
the ``RunnerClient`` protocol.

The HTTP layer (``api/``) and ``mlxrunner run`` only ever use what is defined here; everything
else in ``actors/`` is private to the actor tree.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Protocol

import attrs
import trio

from runtime.engine.options import SamplingOptions
from runtime.errors import RuntimeInputError
from runtime.store.profile import ModelProfile
from runtime.text.structured import OutputFormat


class DoneReason(enum.IntEnum):
    """Why a generation ended; the integers are the native wire values (as Ollama's runner)."""

    STOP = 0  # end-of-sequence token or a stop string
    LENGTH = 1  # num_predict or the context length reached
    CANCELLED = 2  # cut short: only ever in a ``GenerationCut``, never in a done chunk


# ---- request errors (mapped to HTTP statuses in api/errors.py) ----


class QueueFullError(RuntimeInputError):
    """The bounded request queue is full (HTTP 429 with Retry-After)."""


class UnavailableError(RuntimeInputError):
    """The runner cannot take requests now: still loading, or shutting down (HTTP 503)."""

    def __init__(self, message: str, *, state: Literal["loading", "shutting_down"]) -> None:
        super().__init__(message)
        self.state = state


class OverloadedError(RuntimeInputError):
    """As many generations are open as the runner allows (HTTP 503 with Retry-After).

    Unlike ``QueueFullError`` it counts every generation whose last item was not taken yet,
    queued, running or finished but still being read: what bounds the server's memory.
    """


class GenerationError(Exception):
    """An admitted generation could not be completed: a server fault, not the client's.

    Unlike the errors above it is never raised by ``RunnerClient.submit``: it is the last item
    on the generation's channel (the engine failed on this sequence, the scheduler stopped, or
    the request's pipeline hit a bug). The HTTP layer answers 500 if no header was sent yet,
    and ends the stream with an error record otherwise.
    """


class GenerationCut(GenerationError):
    """The generation ended before its end, through no fault of the request or the server.

    Shutdown cut it (the grace period ran out, or a second signal), it was still queued when
    shutdown began (never admitted), or its reader stopped reading for too long. Its text so
    far has been delivered; ``final`` has the totals (``done_reason`` ``CANCELLED``). Retrying
    can succeed, so the HTTP layer answers 503 with Retry-After if no header was sent yet, and
    ends a stream with an error record (native: ``done_reason`` 2), never with success.
    """

    def __init__(self, message: str, final: Chunk | None = None) -> None:
        super().__init__(message)
        self.final = final or Chunk(done=True, done_reason=DoneReason.CANCELLED)


class OutOfMemoryError(GenerationError):
    """The server ran out of memory while running this generation (HTTP 503 with Retry-After).

    The engine has freed what it could (the failed step's rows, the prefix cache); the same
    request may well succeed when retried.
    """


class EngineFaultError(Exception):
    """The engine kept failing (``runtime.scheduling.faults.FaultRule``): the tree stops, and
    ``mlxrunner serve`` exits with status 1. Never sent to a request: it leaves the tree."""


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
    # OpenAI's logit_bias: (token id, value) pairs added to the raw logits of every step.
    logit_bias: tuple[tuple[int, float], ...] = ()


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """One generation. Exactly one of ``prompt``, ``messages`` or ``tokens`` is set.

    ``prompt`` is raw text unless ``template`` is True (then it is wrapped as one user message
    with the model's chat template). ``messages`` always go through the chat template.
    ``think`` reaches the template as ``enable_thinking`` (``None``: the template's default);
    with ``separate_thinking`` a thinking model's ``<think>`` block goes to ``Chunk.thinking``
    instead of the content (routes that have no field for it leave it in the content).
    ``format`` (structured output) constrains the reply to JSON matching a schema, by masking
    the tokens that would leave it at every step; it turns thinking off.
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
    think: bool | None = None
    separate_thinking: bool = False
    format: OutputFormat | None = None


@attrs.frozen(kw_only=True)
class EmbedRequest:
    """Embeddings of ``inputs`` (texts, or token ids as given). ``truncate``: an input longer
    than the context is cut to it (else refused); ``normalize``: unit L2 norm; ``dimensions``:
    keep the first that many values (then normalised, when asked)."""

    inputs: tuple[str | tuple[int, ...], ...]
    truncate: bool = True
    normalize: bool = True
    dimensions: int | None = None


@attrs.frozen(kw_only=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int
    total_duration: int  # ns, from admission


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
    thinking: str = ""  # a thinking model's reasoning (``GenerateRequest.separate_thinking``)
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


GenerationItem = Chunk | GenerationError


class Generation:
    """One admitted generation, as its requester holds it.

    ``chunks`` delivers the generation's ``Chunk``s; the last one has ``done=True``. A
    generation that fails after admission ends with one ``GenerationError`` item instead (a
    ``GenerationCut`` when it was cut short). The channel can also end with neither when the
    tree itself stops (its pipelines are cancelled): read that as a ``GenerationCut``.

    ``close()`` leaves the generation: the pipeline stops, the scheduler drops the sequence
    within one engine step and its cache is freed. It never blocks and is idempotent, so it is
    safe in the ``finally`` of a cancelled task; ``with generation:`` calls it on exit. A
    handle dropped without ``close()`` is closed when it is collected.
    """

    def __init__(
        self,
        chunks: trio.abc.ReceiveChannel[GenerationItem],
        on_close: Callable[[], None],
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.chunks = chunks
        self._on_close: Callable[[], None] | None = on_close

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A response dropped before its body was read never calls close(). The collector may
        # run this on any thread, and closing touches Trio objects, so the loop does it.
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(on_close)


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
    # Prompt positions the engine computed: less than prompt_tokens_total by what the prefix
    # cache and the choices of one request (OpenAI's n) shared.
    prefilled_tokens_total: int = 0
    cache_hits_total: int = 0
    cache_lookups_total: int = 0
    cache_reused_tokens_total: int = 0
    cache_evictions_total: int = 0
    prefix_cache_bytes: int = 0  # the part of cache_bytes kept by prefix-cache entries
    prefix_cache_entries: int = 0
    paused_sequences: int = 0  # running, but paused until their readers catch up
    open_generations: int = 0  # admitted or being admitted, whose last item is not taken yet


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
    embedding_length: int = 0  # the size of the model's hidden states (its embeddings)
    # A stored model's defaults: system prompt, parameters, messages (``runtime.store.profile``).
    profile: ModelProfile = attrs.field(factory=ModelProfile)


class RunnerClient(Protocol):
    """What the HTTP layer (and ``mlxrunner run``) may ask of the actor tree.

    ``cpu_limiter`` bounds the worker threads that run request-sized CPU work (templating,
    tokenizing, detokenizing, decoding large bodies, making large replies), so the event loop
    never does it: the tree's own work and the HTTP layer's share it.
    """

    cpu_limiter: trio.CapacityLimiter

    def health(self) -> Health: ...

    def statistics(self) -> Statistics: ...

    def model_info(self) -> ModelInfo:
        """Raises ``UnavailableError`` while loading."""

    async def tokenize(self, text: str) -> list[int]:
        """On a worker thread. Raises ``UnavailableError`` while loading,
        ``PromptTooLongError`` for text longer than the model's context could hold."""

    async def detokenize(self, tokens: list[int]) -> str:
        """On a worker thread. Raises ``UnavailableError`` while loading, ``OptionsError``
        for unknown ids."""

    async def embed(self, request: EmbedRequest) -> Embeddings:
        """The embeddings of ``request``'s inputs, computed by the loaded model.

        Errors: ``PromptError``/``OptionsError`` (400: an input too long without truncation,
        too many inputs, a bad token id or dimension), ``PromptTooLongError`` (413: too many
        tokens in all), ``QueueFullError`` (429), ``UnavailableError`` and
        ``OverloadedError`` (503), ``GenerationError`` (500: the engine failed).
        """

    async def submit(self, request: GenerateRequest) -> Generation:
        """Admit ``request``; return the handle of its generation (see ``Generation``).

        Errors (raised here, before any chunk): ``OptionsError``/``PromptError`` (400),
        ``PromptTooLongError`` (413), ``QueueFullError`` (429), ``UnavailableError`` and
        ``OverloadedError`` (503). Failures after admission arrive on the handle's channel as a
        ``GenerationError`` (``GenerationCut`` for work cut short).

        Cancellation: cancelled before it returns, nothing was admitted.
        """

    async def submit_choices(self, request: GenerateRequest, n: int) -> list[Generation]:
        """``n`` generations of ``request`` (OpenAI's choices), admitted all or none, as
        ``submit`` admits one. The prompt is computed once and shared. With a seed, choice
        ``i`` draws with seed + i."""
