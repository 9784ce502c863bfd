"""SIGTERM under load, then a second signal: ``mlxrunner serve``'s code in a subprocess over a
tiny real model (``python -m tests.api_fakes --model``: each engine step sleeps ``DELAY``, so
streams are still open when the signal comes).

Eight requests of every kind (streaming and not; native, Ollama and OpenAI) are accepted,
``--parallel`` of them running and the rest queued, then the server gets SIGTERM. The queued
ones are refused at once (they were never started); then
- with a long grace the running ones complete, and the process exits 0;
- with a short grace they are cut: the process exits 0;
- a second signal during the drain cuts them at once, and the process exits 0 at once.
No traceback in any case, and no cut request is reported as a success: a whole reply gets
503 with Retry-After, a stream ends with its family's error record (native ``done_reason``
2 with an ``error``, Ollama's error line, OpenAI's error event without ``[DONE]``).
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
            with trio.fail_after(30):  # every request accepted, PARALLEL of them running
                while (
                    await metric(port, "mlxrunner_active_sequences") < PARALLEL
                    or await metric(port, "mlxrunner_queue_depth") < REQUESTS - PARALLEL
                ):
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


def cut_ending(p: Ask, status: int, headers: dict[str, str], body: bytes) -> str | None:
    """What is wrong with the ending of a cut request, if anything: never a success."""
    if not p.stream:
        if status != 503 or int(headers.get("retry-after", "0")) < 1:
            return f"a cut whole reply answered {status}"
        return None if "error" in json.loads(body) else "no error message"
    last = records(p, body)[-1]
    if status != 200 or "error" not in last:
        return f"a cut stream ended with {last}"
    if p.route == "/completion":
        return None if last.get("done_reason") == 2 else f"done_reason {last.get('done_reason')}"
    if finish_reasons(p, body) or b"[DONE]" in body:
        return "a cut stream claimed an end"
    return None


def assert_running_cut_and_queued_refused(outcome: Outcome, tokens: int) -> None:
    endings = outcome.kinds(every_kind(REQUESTS, tokens))
    assert [cut_ending(*ending) for ending in endings] == [None] * REQUESTS
    never_started = [body for *_, body in endings if b"never started" in body]
    assert len(never_started) == REQUESTS - PARALLEL


async def test_sigterm_lets_running_work_finish_then_exits_0(folder: Path) -> None:
    outcome = await signal_under_load(folder, grace=60, tokens=TOKENS)
    assert_clean_exit(outcome)
    finished = 0
    for p, status, headers, body in outcome.kinds(every_kind(REQUESTS, TOKENS)):
        if b"never started" in body:
            assert cut_ending(p, status, headers, body) is None
            continue
        finished += 1
        assert status == 200, (p, body[-300:])
        assert finish_reasons(p, body) == [1 if p.route == "/completion" else "length"], p
        if p.stream and p.openai:
            assert body.rstrip().endswith(b"data: [DONE]")
    assert finished == PARALLEL


async def test_sigterm_past_the_grace_cuts_the_rest_and_exits_0(folder: Path) -> None:
    # No limit: each request would run to the 1024-position context, ~10 s at DELAY per step.
    outcome = await signal_under_load(folder, grace=0.5, tokens=0)
    assert_clean_exit(outcome)
    assert_running_cut_and_queued_refused(outcome, tokens=0)


async def test_a_second_signal_during_the_drain_exits_0_at_once(folder: Path) -> None:
    outcome = await signal_under_load(folder, grace=60, tokens=0, second_signal=True)
    assert_clean_exit(outcome)
    assert_running_cut_and_queued_refused(outcome, tokens=0)
    assert "SIGTERM again" in outcome.stderr
