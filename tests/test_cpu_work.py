"""Request-sized CPU work stays off the event loop, and text too long for the context is
refused before it is tokenized.

The real tree (``actors.testing``: scripted engine, tiny tokenizer) behind hypercorn on a real
socket. A gated tokenizer blocks in ``encode`` until the test opens its gate: while it blocks,
the loop must go on answering, and no more encodes run at once than the tree's CPU limiter
allows. Its ``gate.wait`` has a limit only so that a loop wrongly blocked in it comes back and
fails the test instead of hanging it.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio

from actors.messages import ChatMessage, GenerateRequest
from actors.pipeline import prepare
from actors.testing import HarnessClient, ScriptedEngine, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from api.schemas import decode_json
from runtime.errors import PromptTooLongError
from tests.api_fakes import raw_request, serve_app
from tests.waits import read_until, wait_until

GATE = "GATED"  # text that makes the gated tokenizer's encode wait
CPU_WORKERS = 2
CONTEXT = 256  # the scripted engine's: a request's context unless num_ctx asks for less


@functools.cache
def tokenizer() -> Any:
    return tiny_tokenizer()


class GatedTokenizer:
    """The tiny tokenizer, recording its calls; ``encode`` of text holding ``GATE`` waits on
    ``gate`` (from a worker thread, or wrongly from the loop)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.calls: list[str] = []
        self.inside = 0  # gated encodes now waiting
        self.most_inside = 0
        self.released: list[bool] = []  # per gated encode: let go by the test (not timed out)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append("apply_chat_template")
        text: str = self.inner.apply_chat_template(*args, **kwargs)
        return text

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        self.calls.append("encode")
        if GATE in text:
            with self._lock:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
            self.released.append(self.gate.wait(timeout=10))
            with self._lock:
                self.inside -= 1
        ids: list[int] = self.inner.encode(text, **kwargs)
        return ids


@attrs.frozen
class Tree:
    harness: HarnessClient
    tokenizer: GatedTokenizer
    host: str
    port: int

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self.harness.runner.cpu_limiter

    async def send(self, method: str, path: str, body: Any = None) -> trio.SocketStream:
        return await raw_request(self.host, self.port, method, path, body)


@pytest.fixture
async def tree() -> AsyncIterator[Tree]:
    tok = GatedTokenizer(tokenizer())
    engine = ScriptedEngine(context_length=CONTEXT)
    async with open_test_runner(engine, tokenizer=tok, cpu_workers=CPU_WORKERS) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake", max_body=1 << 22))
        async with serve_app(app) as (host, port):
            try:
                yield Tree(harness, tok, host, port)
            finally:
                tok.gate.set()  # a failed test must not leave worker threads waiting


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if sep else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def answer(stream: trio.SocketStream) -> tuple[int, Any]:
    """The status and JSON body of the one response on ``stream``."""
    received = await read_until(stream, _complete)
    await stream.aclose()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# ---- the loop stays free ----


async def test_the_loop_answers_while_tokenizing_blocks(tree: Tree) -> None:
    tokenize = await tree.send("POST", "/tokenize", {"content": f"{GATE} hello"})
    chat = {"model": "fake", "messages": [{"role": "user", "content": GATE}], "stream": False}
    generate = await tree.send("POST", "/api/chat", {**chat, "options": {"num_predict": 2}})
    await wait_until(lambda: tree.tokenizer.inside == 2, "both encodes blocked")
    assert await answer(await tree.send("GET", "/health")) == (200, {"status": "ok"})
    tree.tokenizer.gate.set()
    status, body = await answer(tokenize)
    assert status == 200
    assert body["tokens"] == tree.tokenizer.inner.encode(f"{GATE} hello")
    status, body = await answer(generate)
    assert (status, body["done"]) == (200, True)
    assert tree.tokenizer.released == [True, True]  # neither blocked the loop until its timeout


async def test_no_more_than_cpu_workers_jobs_run_at_once(tree: Tree) -> None:
    streams = [await tree.send("POST", "/tokenize", {"content": GATE}) for _ in range(3)]
    body = {"prompt": GATE, "stream": False, "options": {"num_predict": 1}}
    streams.append(await tree.send("POST", "/completion", body))  # prompt preparation
    waiting = 4 - CPU_WORKERS

    def parked() -> bool:
        # Both borrowers must be inside ``encode``: a thread that took a token may not have
        # reached it yet.
        stats = tree.limiter.statistics()
        return stats.tasks_waiting == waiting and tree.tokenizer.inside == CPU_WORKERS

    await wait_until(parked, f"{CPU_WORKERS} jobs running, {waiting} waiting for the limiter")
    assert tree.tokenizer.inside == tree.limiter.statistics().borrowed_tokens == CPU_WORKERS
    tree.tokenizer.gate.set()
    assert [(await answer(s))[0] for s in streams] == [200] * 4
    assert tree.tokenizer.most_inside == CPU_WORKERS
    assert tree.tokenizer.released == [True] * 4


# ---- text too long for the context ----


async def test_text_longer_than_the_context_could_hold_is_refused_before_tokenizing(
    tree: Tree,
) -> None:
    per_token = tree.tokenizer.max_token_chars
    limit = CONTEXT * per_token
    too_long = "a" * (limit + 1)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/completion", {"prompt": too_long}),
        ("/api/generate", {"model": "fake", "prompt": too_long, "raw": True}),
        ("/v1/completions", {"model": "fake", "prompt": "a" * (16 * per_token + 1), "num_ctx": 16}),
        ("/tokenize", {"content": too_long}),
    ]
    for path, body in requests:
        status, reply = await answer(await tree.send("POST", path, body))
        assert status == 413, (path, reply)
        assert "cannot fit" in reply["error"]
    half = {"role": "user", "content": "a" * (limit // 2 + 1)}
    chat = {"model": "fake", "messages": [half, half], "stream": False}
    status, reply = await answer(await tree.send("POST", "/api/chat", chat))
    assert status == 413
    assert tree.tokenizer.calls == ["apply_chat_template"]  # rendered, never tokenized
    # The bound is the limit itself, not less: text of exactly that length is tokenized.
    at_limit = {"prompt": "a" * limit, "stream": False}
    status, reply = await answer(await tree.send("POST", "/completion", at_limit))
    assert tree.tokenizer.calls[-1] == "encode"
    assert status == 413
    assert "exceeds the context length" in reply["error"]


def test_prepare_checks_the_rendered_text_against_the_request_context() -> None:
    tok: Any = GatedTokenizer(tokenizer())
    per_token = tok.max_token_chars
    messages = (ChatMessage(role="user", content="a" * (8 * per_token)),)
    request = GenerateRequest(messages=messages)
    with pytest.raises(PromptTooLongError, match="cannot fit in 8 tokens"):
        prepare(attrs.evolve(request, options=attrs.evolve(request.options, num_ctx=8)), tok, 64)
    assert tok.calls == ["apply_chat_template"]


# ---- what runs on the worker threads never touches MLX ----


def _trip_mlx(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap every function and type of ``mlx.core`` (and its function submodules) to record
    its calls: no MLX work can start without one of them (an array has to come from one)."""
    import mlx.core as mx

    calls: list[str] = []

    def recording(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    for module in (mx, mx.random, mx.fast, mx.linalg, mx.fft):
        for name in dir(module):
            value = getattr(module, name)
            if not name.startswith("_") and callable(value):
                monkeypatch.setattr(module, name, recording(f"{module.__name__}.{name}", value))
    return calls


def test_the_work_sent_to_worker_threads_calls_nothing_in_mlx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlx.core as mx

    tok = tokenizer()
    chat = GenerateRequest(
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="hi"),
        ),
    )
    body = json.dumps({"prompt": "x" * 70_000, "options": {"stop": ["\n"]}}).encode()
    calls = _trip_mlx(monkeypatch)
    mx.zeros(1)
    assert calls == ["mlx.core.zeros"]  # the tripwire sees MLX when it is used
    calls.clear()
    # What Runner.submit, /tokenize, /detokenize and read_json send to worker threads:
    prepare(chat, tok, 256)
    prepare(GenerateRequest(prompt="hello world"), tok, 256)
    tok.decode(tok.encode("hello world"))
    decode_json(body)
    assert calls == []
