"""SIGTERM under load, then a second signal: ``mlxrunner serve``'s code in a subprocess over a
tiny real model (``python -m tests.api_fakes --model``: each engine step sleeps ``DELAY``, so
streams are still open when the signal comes).

Eight requests of every kind (streaming and not; native, Ollama and OpenAI; more than
``--parallel``, so some are still queued) are accepted, then the server gets SIGTERM:
- with a long grace every accepted request completes, and the process exits 0;
- with a short grace the rest is cut: the process exits 0 and every client gets an ending;
- a second signal during the drain ends the process at once, with exit 0 and no traceback.

What a cut request receives is changing (issue 11, point 5, the "endings" work): a cut
stream is to end with an explicit error record and a cut whole reply with 503. Those
assertions are the ``xfail(strict=True)`` tests below; they start passing, and must then
lose their marker, when that work lands.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.live_server import make_model
from tests.test_api_serve import get, server_process
from tests.traffic import Ask, every_kind, exchange, head_and_body

DELAY = 0.01  # seconds per engine step
REQUESTS = 8
PARALLEL = 4
TOKENS = 50  # for the drain: two waves of 50 steps, about 1 s after the signal
ENDINGS = "cut work ends with an error record or 503 (issue 11 point 5, the endings branch)"


@attrs.frozen
class Outcome:
    answers: dict[int, bytes]
    refused: bytes  # a request sent while draining
    code: int
    stderr: str

    def kinds(self, asks: list[Ask]) -> list[tuple[Ask, int, dict[str, str], bytes]]:
        return [(ask, *head_and_body(self.answers[i])) for i, ask in enumerate(asks)]


async def metric(port: int, name: str) -> float:
    text = (await get("/metrics", port)).decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def signal_under_load(
    folder: Path, *, grace: float, tokens: int, second_signal: bool = False
) -> Outcome:
    command = [sys.executable, "-m", "tests.api_fakes", "--delay", str(DELAY)]
    command += ["--model", str(folder), "--grace", str(grace), "--parallel", str(PARALLEL)]
    async with server_process(*command) as (process, port, stderr):
        with trio.fail_after(60):  # load guard
            while b'"ok"' not in await get("/health", port):
                await trio.sleep(0.02)
        answers: dict[int, bytes] = {}

        async def ask(index: int, asked: Ask) -> None:
            answers[index] = await exchange("127.0.0.1", port, asked, index)

        async with trio.open_nursery() as nursery:
            for index, asked in enumerate(every_kind(REQUESTS, tokens)):
                nursery.start_soon(ask, index, asked)
            with trio.fail_after(30):  # every request accepted (running or queued)
                while await metric(port, "mlxrunner_runner_requests_total") < REQUESTS:
                    await trio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                while b"shutting_down" not in await get("/health", port):
                    await trio.sleep(0.01)
            late = Ask("/completion", False, 3)
            refused = await exchange("127.0.0.1", port, late, REQUESTS)
            if second_signal:
                process.send_signal(signal.SIGTERM)
            # A hang guard, and for the second signal "at once": the grace is 60 s.
            with trio.fail_after(20):
                code = await process.wait()
        return Outcome(answers, refused, code, b"".join(stderr).decode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("sigterm") / "tiny")


def assert_clean_exit(outcome: Outcome) -> None:
    assert outcome.code == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    status, headers, _ = head_and_body(outcome.refused)
    assert status == 503
    assert int(headers["retry-after"]) >= 1


def records(p: Ask, body: bytes) -> list[dict[str, Any]]:
    """The JSON records of an answer: NDJSON lines, SSE events, or the one object."""
    if p.openai and p.stream:
        events = re.findall(rb"^data: (.*)$", body, re.MULTILINE)
        return [json.loads(e) for e in events if e != b"[DONE]"]
    return [json.loads(line) for line in re.findall(rb"^\{.*\}$", body, re.MULTILINE)]


def finish_reasons(p: Ask, body: bytes) -> list[Any]:
    """What the records say about the end: done_reason, or OpenAI's finish_reason."""
    out = []
    for record in records(p, body):
        if p.openai:
            out += [c.get("finish_reason") for c in record.get("choices", [])]
        elif record.get("done"):
            out.append(record.get("done_reason"))
    return [r for r in out if r is not None]


async def test_sigterm_lets_accepted_work_finish_then_exits_0(folder: Path) -> None:
    outcome = await signal_under_load(folder, grace=60, tokens=TOKENS)
    assert_clean_exit(outcome)
    for p, status, _, body in outcome.kinds(every_kind(REQUESTS, TOKENS)):
        assert status == 200, (p, body[-300:])
        assert finish_reasons(p, body) == [1 if p.route == "/completion" else "length"], p
        if p.stream and p.openai:
            assert body.rstrip().endswith(b"data: [DONE]")


@pytest.fixture(scope="module")
def cut(folder: Path) -> Outcome:
    # No limit: each request would run to the 1024-position context, ~10 s at DELAY per
    # step; the grace cuts them all, running or still queued.
    return trio.run(lambda: signal_under_load(folder, grace=0.5, tokens=0))


def test_sigterm_past_the_grace_cuts_the_rest_and_exits_0(cut: Outcome) -> None:
    assert_clean_exit(cut)
    assert sorted(cut.answers) == list(range(REQUESTS))  # every client got an ending
    for p, status, _, body in cut.kinds(every_kind(REQUESTS, 0)):
        if p.route == "/completion" and p.stream:
            assert status == 200
            assert finish_reasons(p, body) == [2], body[-300:]  # cancelled
        # What the others get today (the endings work replaces it): a 200 whose last record
        # looks like an end.
        assert status in (200, 503), (p, body[-300:])


@pytest.mark.xfail(strict=True, reason=ENDINGS)
def test_a_cut_whole_reply_is_503_with_retry_after(cut: Outcome) -> None:
    for p, status, headers, body in cut.kinds(every_kind(REQUESTS, 0)):
        if not p.stream:
            assert status == 503, (p, body[-300:])
            assert int(headers["retry-after"]) >= 1


@pytest.mark.xfail(strict=True, reason=ENDINGS)
def test_a_cut_ollama_stream_ends_with_an_error_line(cut: Outcome) -> None:
    for p, _, _, body in cut.kinds(every_kind(REQUESTS, 0)):
        if p.stream and p.route.startswith("/api/"):
            assert "error" in records(p, body)[-1], body[-300:]
            assert finish_reasons(p, body) == []  # no success claimed


@pytest.mark.xfail(strict=True, reason=ENDINGS)
def test_a_cut_openai_stream_ends_with_an_error_event(cut: Outcome) -> None:
    for p, _, _, body in cut.kinds(every_kind(REQUESTS, 0)):
        if p.stream and p.openai:
            assert "error" in records(p, body)[-1], body[-300:]
            assert finish_reasons(p, body) == []  # no success claimed


async def test_a_second_signal_during_the_drain_exits_0_at_once(folder: Path) -> None:
    outcome = await signal_under_load(folder, grace=60, tokens=0, second_signal=True)
    assert_clean_exit(outcome)
    assert sorted(outcome.answers) == list(range(REQUESTS))  # no client left hanging
    assert "again: stopping now" in outcome.stderr
