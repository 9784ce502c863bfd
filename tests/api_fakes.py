"""A scripted ``RunnerClient`` for the HTTP tests: no model, no engine, no MLX.

Each generation streams the words of ``script`` (one token each, ids from 1), then a final
chunk; with ``endless=True`` it streams until cancelled. ``step`` is awaited before every
token, so a test can pace or freeze generation. Statistics count what was really produced,
which is what the disconnect tests watch.
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
    GenerateRequest,
    Health,
    Logprob,
    ModelInfo,
    Statistics,
    UnavailableError,
)
from runtime.errors import OptionsError

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
    admission: trio.Event | None = None  # when set: generate() waits on it, as if queued
    waiting: int = 0

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

    def tokenize(self, text: str) -> list[int]:
        self._ready()
        return [len(word) for word in text.split()]

    def detokenize(self, tokens: list[int]) -> str:
        self._ready()
        if any(t < 0 for t in tokens):
            raise OptionsError("token ids must be >= 0")
        return " ".join(f"<{t}>" for t in tokens)

    @asynccontextmanager
    async def generate(
        self, request: GenerateRequest
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Chunk]]:
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
        send, receive = trio.open_memory_channel[Chunk](0)
        self.active += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, request, send)
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            receive.close()

    async def _produce(self, request: GenerateRequest, send: trio.MemorySendChannel[Chunk]) -> None:
        limit = request.options.num_predict
        count = 0
        reason = DoneReason.STOP
        # send.close(), not ``async with send``: aclose() checkpoints, and a Cancelled there
        # would replace an error on its way out.
        try:
            with send:
                while self.endless or count < len(self.script):
                    if 0 < limit <= count:
                        reason = DoneReason.LENGTH
                        break
                    await self.step()
                    if self.fail_at is not None and count >= self.fail_at:
                        raise RuntimeError("engine failed")
                    word = self.script[count % len(self.script)]
                    logprobs: tuple[Logprob, ...] = ()
                    if request.logprobs:
                        top = tuple((f"alt{i}", -1.0 - i) for i in range(request.top_logprobs))
                        logprobs = (Logprob(token=word, token_id=count + 1, logprob=-0.5, top=top),)
                    self.generated += 1
                    count += 1
                    await send.send(Chunk(content=word, tokens=(count,), logprobs=logprobs))
                self.finished += 1
                await send.send(
                    Chunk(
                        done=True,
                        done_reason=reason,
                        prompt_eval_count=self.prompt_tokens,
                        prompt_eval_duration=1000,
                        eval_count=count,
                        eval_duration=2000 * count,
                        total_duration=5000,
                    )
                )
        except trio.Cancelled:
            self.cancelled += 1
            raise
        except trio.BrokenResourceError:
            self.cancelled += 1


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


def _serve_scripted_main() -> None:
    """``python -m tests.api_fakes [--delay S] [serve flags]``: ``mlxrunner serve``'s code over
    the actor tree with a scripted engine (each step sleeps ``delay`` on the engine thread)."""
    import logging
    import sys

    from actors.testing import scripted_load, tiny_tokenizer
    from cli.main import build_parser
    from cli.serve import serve

    argv = sys.argv[1:]
    delay = 0.01
    if argv[:1] == ["--delay"]:
        delay, argv = float(argv[1]), argv[2:]

    engine = slow_engine(delay)
    args = build_parser().parse_args(["serve", "--model", "fake", "--port", "0", *argv])
    logging.basicConfig(level=logging.INFO)
    trio.run(functools.partial(serve, args, load=scripted_load(engine, tiny_tokenizer())))


if __name__ == "__main__":
    _serve_scripted_main()
