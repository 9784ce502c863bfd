"""A scripted ``RunnerClient`` for the HTTP tests: no model, no engine, no MLX.

Each generation streams the words of ``script`` (one token each, ids from 1), then a final
chunk; with ``endless=True`` it streams until its handle is closed. ``step`` is awaited before
every token, so a test can pace or freeze generation. Chunks are made when the reader asks for
them (no task of its own), so once a handle is closed nothing more is produced: ``active``,
``cancelled`` and ``finished`` are what the disconnect tests watch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from actors.messages import (
    Chunk,
    DoneReason,
    Embeddings,
    EmbedRequest,
    GenerateRequest,
    Generation,
    GenerationCut,
    GenerationError,
    GenerationItem,
    Health,
    Logprob,
    ModelInfo,
    Statistics,
    UnavailableError,
)
from runtime.errors import OptionsError
from runtime.testing.engine_wrapper import DelegatingEngine

CUT_MESSAGE = "the server is shutting down: the generation was cut short after 2 tokens"

INFO = ModelInfo(
    name="fake:latest",
    model_type="llama",
    context_length=64,
    parameters=134_515_008,
    quantization="Q4_1",
    chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
    size_bytes=92_000_000,
    digest="sha256:" + "ab" * 32,
    modified_at=1_700_000_000.0,
    family="llama",
)


async def _no_wait() -> None:
    await trio.lowlevel.checkpoint()


@attrs.define(kw_only=True)
class FakeRunner:
    script: tuple[str, ...] = ("Hello", " world", "!")
    endless: bool = False
    prompt_tokens: int = 5
    step: Callable[[], Awaitable[None]] = _no_wait
    state: Literal["loading", "ok", "shutting_down"] = "ok"
    progress: float = 0.0
    entry_error: Exception | None = None
    requests: list[GenerateRequest] = attrs.field(factory=list)
    active: int = 0
    cancelled: int = 0
    generated: int = 0
    finished: int = 0
    fail_at: int | None = None  # raise (a runner fault) before producing this token
    cut_at: int | None = None  # end with a GenerationCut (shutdown) before this token
    vanish_at: int | None = None  # the channel just ends (the tree stopped) before this token
    admission: trio.Event | None = None  # when set: generate() waits on it, as if queued
    waiting: int = 0
    cpu_limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(2))

    # ---- RunnerClient ----

    def health(self) -> Health:
        return Health(status=self.state, progress=self.progress)

    def statistics(self) -> Statistics:
        return Statistics(
            active_sequences=self.active,
            queued_requests=0,
            cache_bytes=1024 * self.active,
            requests_total=len(self.requests),
            cancelled_total=self.cancelled,
            prompt_tokens_total=self.prompt_tokens * len(self.requests),
            generated_tokens_total=self.generated,
            cache_hits_total=1,
            cache_lookups_total=4,
        )

    def _ready(self) -> None:
        if self.state != "ok":
            raise UnavailableError(f"model is {self.state}", state=self.state)

    def model_info(self) -> ModelInfo:
        self._ready()
        return INFO

    async def tokenize(self, text: str) -> list[int]:
        self._ready()
        await trio.lowlevel.checkpoint()
        return [len(word) for word in text.split()]

    async def detokenize(self, tokens: list[int]) -> str:
        self._ready()
        await trio.lowlevel.checkpoint()
        if any(t < 0 for t in tokens):
            raise OptionsError("token ids must be >= 0")
        return " ".join(f"<{t}>" for t in tokens)

    async def embed(self, request: EmbedRequest) -> Embeddings:
        self._ready()
        await trio.lowlevel.checkpoint()
        vectors = [[float(len(item)), 1.0] for item in request.inputs]
        return Embeddings(vectors=vectors, prompt_tokens=len(vectors), total_duration=1)

    async def submit(self, request: GenerateRequest) -> Generation:
        self._ready()
        if self.entry_error is not None:
            raise self.entry_error
        if self.admission is not None:
            self.waiting += 1
            try:
                await self.admission.wait()
            finally:
                self.waiting -= 1
        self.requests.append(request)
        self.active += 1
        chunks = _ScriptedChunks(self, request)
        return Generation(chunks, chunks.close)

    async def submit_choices(self, request: GenerateRequest, n: int) -> list[Generation]:
        return [await self.submit(request) for _ in range(n)]


class _ScriptedChunks(trio.abc.ReceiveChannel[GenerationItem]):
    """One fake generation's channel: each ``receive`` makes the next item."""

    def __init__(self, fake: FakeRunner, request: GenerateRequest) -> None:
        self._fake = fake
        self._request = request
        self._count = 0
        self._ended = False  # the last item was made
        self._closed = False

    async def receive(self) -> GenerationItem:
        fake, request = self._fake, self._request
        if self._closed:
            raise trio.ClosedResourceError
        if self._ended:
            raise trio.EndOfChannel
        limit = request.options.num_predict
        more = fake.endless or self._count < len(fake.script)
        if more and not 0 < limit <= self._count:
            await fake.step()
            if self._closed:  # closed while pacing
                raise trio.ClosedResourceError
            if fake.fail_at is not None and self._count >= fake.fail_at:
                self._end()
                return GenerationError("engine failed")
            if fake.cut_at is not None and self._count >= fake.cut_at:
                self._end()
                totals = Chunk(
                    done=True,
                    done_reason=DoneReason.CANCELLED,
                    prompt_eval_count=fake.prompt_tokens,
                    eval_count=self._count,
                )
                return GenerationCut(CUT_MESSAGE, totals)
            if fake.vanish_at is not None and self._count >= fake.vanish_at:
                self._end()
                raise trio.EndOfChannel
            word = fake.script[self._count % len(fake.script)]
            logprobs: tuple[Logprob, ...] = ()
            if request.logprobs:
                top = tuple((f"alt{i}", -1.0 - i) for i in range(request.top_logprobs))
                logprobs = (Logprob(token=word, token_id=self._count + 1, logprob=-0.5, top=top),)
            fake.generated += 1
            self._count += 1
            return Chunk(content=word, tokens=(self._count,), logprobs=logprobs)
        fake.finished += 1
        self._end()
        return Chunk(
            done=True,
            done_reason=DoneReason.STOP if not more else DoneReason.LENGTH,
            prompt_eval_count=fake.prompt_tokens,
            prompt_eval_duration=1000,
            eval_count=self._count,
            eval_duration=2000 * self._count,
            total_duration=5000,
        )

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._fake.active -= 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self._fake.cancelled += 1
            self._end()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def serve_app(app: Any, *, grace: float = 1.0) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` with hypercorn on 127.0.0.1:<free port>; yields (host, port)."""
    from api.app import hypercorn_config, serve_http

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                serve_http, app, hypercorn_config("127.0.0.1", 0, grace), shutdown_trigger=stop.wait
            )
        )
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        try:
            yield host, int(port)
        finally:
            nursery.cancel_scope.cancel()


async def raw_request(
    host: str, port: int, method: str, path: str, body: Any = None
) -> trio.SocketStream:
    """Open a connection and send one HTTP/1.1 request; the caller reads and closes."""
    stream = await trio.open_tcp_stream(host, port)
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    await stream.send_all(head + data)
    return stream


def slow_engine(delay: float, context_length: int = 100_000) -> Any:
    """The harness's scripted engine, sleeping ``delay`` s per step on the engine thread; each
    sequence repeats its last prompt token until its budget (or the context) is spent."""
    import time

    from actors.testing import ScriptedEngine

    class SlowEngine(ScriptedEngine):
        def step(self) -> Any:
            time.sleep(delay)
            return super().step()

    return SlowEngine(lambda r: [r.prompt[-1]] * r.max_tokens, context_length=context_length)


class PacedEngine(DelegatingEngine):
    """A real engine that sleeps ``delay`` s before each step, so a test can keep streams
    open across a signal (the tiny model alone finishes in milliseconds).

    It never ends a sequence at an end-of-sequence token: the tiny model's random weights do
    produce one now and then, and a stream that ends by itself, sooner or later than the
    signal depending on timing, would make the tests' expected endings depend on timing."""

    def __init__(self, inner: Any, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        inner._eos = frozenset()  # a ModelEngine's end-of-sequence ids (test-only seam)

    def step(self) -> Any:
        import time

        time.sleep(self.delay)
        return self.inner.step()


def _serve_scripted_main() -> None:
    """``python -m tests.api_fakes [--delay S] [--model FOLDER] [serve flags]``: ``mlxrunner
    serve``'s code over the actor tree with a scripted engine, or with ``--model`` the real
    engine over a model folder; either sleeps ``delay`` s per step on the engine thread."""
    import logging
    import sys

    from actors.config import RunnerConfig
    from actors.loading import model_loader
    from actors.testing import scripted_load, tiny_tokenizer
    from cli.main import build_parser
    from cli.serve import runner_options, serve

    argv = sys.argv[1:]
    delay = 0.01
    if argv[:1] == ["--delay"]:
        delay, argv = float(argv[1]), argv[2:]
    load: Callable[[Callable[[float], None]], Any]
    if "--model" in argv:
        args = build_parser().parse_args(["serve", "--port", "0", *argv])
        real = model_loader(RunnerConfig(**runner_options(args)))

        def load(progress: Callable[[float], None]) -> Any:
            loaded = real(progress)
            return attrs.evolve(loaded, engine=PacedEngine(loaded.engine, delay))

    else:
        args = build_parser().parse_args(["serve", "--model", "fake", "--port", "0", *argv])
        load = scripted_load(slow_engine(delay), tiny_tokenizer())
    logging.basicConfig(level=logging.INFO)
    trio.run(functools.partial(serve, args, load=load))


if __name__ == "__main__":
    _serve_scripted_main()
