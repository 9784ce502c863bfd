"""One request failing while its client hangs up harms no other request.

The real tree (``actors.testing``: scripted engine, tiny tokenizer) behind hypercorn on a
real socket. A bystander streams throughout; a victim fails at one point of its life
(queued, admitted, prefill, decode, final write) while its client disconnects, in each
order. Afterwards the bystander's stream is complete, a new request works, ``/health`` is
ok, nothing was logged as an escaped error, and the tree closes cleanly.

The engine pauses at the chosen point (``PausingEngine``), so the fault lands exactly there.
Until the final write the fault is the scheduler's own way of failing one sequence, an
``EngineFailed`` marker on its reply channel; at the final write it is a bug in the
pipeline (the detokenizer's last flush raises).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors.messages import GenerationError
from actors.scheduler_records import EngineFailed, Reply, Submission
from actors.testing import HarnessClient, ScriptedEngine, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from tests.api_fakes import raw_request, serve_app
from tests.waits import read_until, wait_until

BYSTANDER_TOKENS = 24  # more than the victim's 11 steps: it is still streaming at the fault
VICTIM_PROMPT = "victim " * 8  # 48 tokens: five prefill-only steps of 8
VICTIM_TOKENS = 6


@functools.cache
def tokenizer() -> Any:
    return tiny_tokenizer()


class PausingEngine(ScriptedEngine):
    """The scripted engine, able to stop before a step until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__(lambda r: [r.prompt[-1]] * r.max_tokens)
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._when: Callable[[PausingEngine], bool] | None = None

    def pause_when(self, predicate: Callable[[PausingEngine], bool]) -> None:
        """Pause before the first step at which ``predicate(self)`` holds (once)."""
        self.paused.clear()
        self._when = predicate

    async def wait_paused(self) -> None:
        with trio.fail_after(10):  # hang guard
            await trio.to_thread.run_sync(self.paused.wait, abandon_on_cancel=True)

    def resume(self) -> None:
        self._resume.set()

    def step(self) -> Any:  # engine thread
        when = self._when
        if when is not None and when(self):
            self._when = None
            self.paused.set()
            self._resume.wait()
            self._resume.clear()
        return super().step()

    def victim(self) -> Any:
        return next((s for s in self.seqs.values() if len(s.request.prompt) > 8), None)


class _FinishFails:
    """A detokenizer whose last flush raises: a bug in the pipeline at the final write."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def add(self, token: int) -> str:
        text: str = self._inner.add(token)
        return text

    def finish(self) -> str:
        raise RuntimeError("detokenizer bug")


@attrs.define
class FaultyTokenizer:
    """The tiny tokenizer; the victim's detokenizer (known by its context) is broken."""

    inner: Any
    victim_context: tuple[int, ...]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def detokenizer(self, context: Any = ()) -> Any:
        detokenizer = self.inner.detokenizer(context)
        if tuple(context) == self.victim_context:
            return _FinishFails(detokenizer)
        return detokenizer


@attrs.define
class Scene:
    harness: HarnessClient
    engine: PausingEngine
    host: str
    port: int
    submissions: list[Submission]

    def inject_engine_failure(self) -> None:
        reply: trio.MemorySendChannel[Reply] = self.submissions[1].reply  # the victim's
        # The scheduler's own `_end` does the same: a failed sequence gets the marker, and
        # a requester already gone makes the send fail.
        try:
            reply.send_nowait(EngineFailed(RuntimeError("injected")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.fixture
async def scene(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Scene]:
    phase = request.node.callspec.params["phase"]
    engine = PausingEngine()
    victim_context = tuple(tokenizer().encode(VICTIM_PROMPT)[-4:])
    tok = FaultyTokenizer(tokenizer(), victim_context) if phase == "final write" else tokenizer()
    parallel = 1 if phase == "queued" else 2
    async with open_test_runner(engine, tokenizer=tok, parallel=parallel) as harness:
        assert harness.runner.ready is not None
        scheduler = harness.runner.ready.scheduler
        submissions: list[Submission] = []
        submit = scheduler.submit_nowait

        def recording_submit(submission: Submission) -> None:
            submit(submission)
            submissions.append(submission)

        monkeypatch.setattr(scheduler, "submit_nowait", recording_submit)
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        try:
            async with serve_app(app) as (host, port):
                yield Scene(harness, engine, host, port, submissions)
        finally:
            engine.resume()  # never leave the engine thread waiting


def last_line(received: bytes) -> dict[str, Any]:
    body = received.split(b"\r\n\r\n", 1)[1]
    lines = [line for line in body.split(b"\n") if line.startswith(b"{")]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


PHASES = {
    # Where the victim is when the engine pauses (checked before each step).
    "admitted": lambda e: (v := e.victim()) is not None and v.prefill_left == len(v.request.prompt),
    "prefill": lambda e: (
        (v := e.victim()) is not None and 0 < v.prefill_left < len(v.request.prompt)
    ),
    "decode": lambda e: (v := e.victim()) is not None and v.produced >= 2,
    "final write": lambda e: (v := e.victim()) is not None and v.produced == VICTIM_TOKENS - 1,
}


@pytest.mark.parametrize("phase", ["queued", "admitted", "prefill", "decode", "final write"])
@pytest.mark.parametrize("order", ["together", "fault first", "disconnect first"])
@pytest.mark.parametrize("route", ["/completion", "/api/generate"])
async def test_a_failure_racing_a_disconnect_harms_no_other_request(
    scene: Scene, phase: str, order: str, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine, harness = scene.engine, scene.harness
    # The bystander streams, and the engine pauses once its first token is out.
    engine.pause_when(lambda e: any(s.produced for s in e.seqs.values()))
    bystander = await raw_request(
        scene.host,
        scene.port,
        "POST",
        "/completion",
        {"prompt": "hi", "options": {"num_predict": BYSTANDER_TOKENS}},
    )
    await engine.wait_paused()
    victim = await raw_request(
        scene.host,
        scene.port,
        "POST",
        route,
        {
            "model": "fake",
            "prompt": VICTIM_PROMPT,
            "raw": True,
            "stream": route == "/completion",
            "options": {"num_predict": VICTIM_TOKENS},
        },
    )
    await wait_until(lambda: harness.statistics().queued_requests == 1)
    if phase != "queued":
        engine.pause_when(PHASES[phase])
        engine.resume()
        await engine.wait_paused()

    def fault() -> None:
        if phase == "final write":
            engine.resume()  # the last token comes, and the pipeline's flush fails
        else:
            scene.inject_engine_failure()

    if order == "together":
        fault()
        await victim.aclose()  # before the server runs again
    elif order == "fault first":
        fault()
        answer = await read_until(victim, b"internal error", eof_ok=True)
        await victim.aclose()
        assert b"internal error (request id " in answer  # the victim's client was told
        if route == "/api/generate":
            assert answer.startswith(b"HTTP/1.1 500")
    else:
        await victim.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the server has seen the hang-up
        fault()
    engine.resume()

    received = await read_until(bystander, b'"done":true', eof_ok=True)
    await bystander.aclose()
    done = last_line(received)
    assert done["done_reason"] == 1  # length: the whole stream, not cut
    assert done["eval_count"] == BYSTANDER_TOKENS

    again = await raw_request(
        scene.host,
        scene.port,
        "POST",
        "/completion",
        {"prompt": "again", "options": {"num_predict": 3}},
    )
    received = await read_until(again, b'"done":true', eof_ok=True)
    await again.aclose()
    assert received.startswith(b"HTTP/1.1 200")
    assert last_line(received)["eval_count"] == 3

    health = await raw_request(scene.host, scene.port, "GET", "/health")
    assert (await read_until(health, b"}", eof_ok=True)).startswith(b"HTTP/1.1 200")
    await health.aclose()

    await wait_until(lambda: harness.statistics().active_sequences == 0)
    assert harness.statistics().queued_requests == 0
    assert not engine.seqs  # the victim's sequence was dropped too

    def reported(record: logging.LogRecord) -> bool:
        # The pipeline's report, and the HTTP layer's line that ties a failed generation to
        # its request's id: expected. Anything else at ERROR escaped a handler.
        if record.name == "mlxrunner.pipeline":
            return True
        failure = record.exc_info[1] if record.exc_info else None
        return record.name == "api.errors" and isinstance(failure, GenerationError)

    escaped = [r for r in caplog.records if r.levelno >= logging.ERROR and not reported(r)]
    assert escaped == []
