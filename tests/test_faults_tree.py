"""Faults injected at step N, through the actor tree, HTTP and the ``serve`` process.

A failed step fails exactly the sequences in it; queued and later requests get the tokens a
fault-free run gives them. Out of memory answers 503 and the server stays healthy. A fault that
keeps repeating ends the tree, and ``serve`` exits 1 after one log line.
"""

from __future__ import annotations

import functools
import logging
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.config import Loaded
from actors.messages import (
    EmbedRequest,
    EngineFaultError,
    GenerateRequest,
    GenerationError,
    GenerationOptions,
    OutOfMemoryError,
)
from actors.runner import Runner
from actors.testing import (
    ScriptedEngine,
    fake_info,
    open_test_runner,
    read_to_end,
    scripted_load,
    tiny_tokenizer,
)
from actors.tree import open_runner
from api.app import ApiConfig, create_app
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.models.loader import load_model
from runtime.testing.faults import (
    FaultInjectingEngine,
    FaultPlan,
    at_steps,
    engine_bug,
    from_step,
    out_of_memory,
)
from runtime.testing.models import make_tiny_folder
from tests.api_fakes import raw_request, serve_app
from tests.test_api_serve import get, server_process
from tests.waits import read_until, wait_until

VICTIMS = ((5, 17, 99, 3, 250, 41, 7), (12, 300, 8))
QUEUED = (60, 61, 62, 63)
LATER = (150, 151, 152, 153, 154)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama")


@functools.cache
def tokenizer() -> Any:
    return tiny_tokenizer()


def _request(prompt: tuple[int, ...], num_predict: int, seed: int) -> GenerateRequest:
    sampling = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.1, seed=seed)
    return GenerateRequest(
        tokens=prompt, options=GenerationOptions(sampling=sampling, num_predict=num_predict)
    )


async def _tokens(runner: Runner, request: GenerateRequest) -> list[int]:
    with await runner.submit(request) as generation:
        return [t for chunk in await read_to_end(generation) for t in chunk.tokens]


@asynccontextmanager
async def _real_tree(
    folder: Path, plan: FaultPlan, **options: Any
) -> AsyncIterator[tuple[Runner, FaultInjectingEngine]]:
    """The tree over a tiny ``ModelEngine`` whose steps fail as ``plan`` says."""
    engines: list[FaultInjectingEngine] = []

    def load(progress: Callable[[float], None]) -> Loaded:
        loaded = load_model(folder)
        engine = FaultInjectingEngine(ModelEngine(loaded, prefill_chunk=8), plan)
        engines.append(engine)
        info = fake_info(context_length=engine.context_length)
        return Loaded(engine=engine, tokenizer=loaded.tokenizer, info=info)

    async with open_runner(load=load, **options) as runner:
        await runner.wait_ready()
        yield runner, engines[0]


async def _until_freed(runner: Runner) -> None:
    await wait_until(
        lambda: (
            (stats := runner.statistics()).active_sequences == 0
            and stats.cache_bytes == stats.prefix_cache_bytes
        ),
        "the batch to give its rows back",
    )


async def test_a_fault_at_step_n_fails_its_sequences_and_no_other(folder: Path) -> None:
    async with _real_tree(folder, at_steps({}), parallel=2) as (runner, _):
        fault_free = [
            await _tokens(runner, _request(QUEUED, 8, seed=3)),
            await _tokens(runner, _request(LATER, 8, seed=4)),
        ]
    async with _real_tree(folder, at_steps({3: engine_bug}), parallel=2) as (runner, engine):
        failures: list[GenerationError] = []
        got: list[list[int]] = []

        async def victim(prompt: tuple[int, ...], seed: int) -> None:
            with pytest.raises(GenerationError) as caught:
                await _tokens(runner, _request(prompt, 60, seed=seed))
            failures.append(caught.value)

        async def queued() -> None:
            got.append(await _tokens(runner, _request(QUEUED, 8, seed=3)))

        engine.gate = threading.Event()  # no step until all three are in
        try:
            async with trio.open_nursery() as nursery:
                for i, prompt in enumerate(VICTIMS):
                    nursery.start_soon(victim, prompt, i)
                await wait_until(lambda: sum(_load(runner)) == 2)
                nursery.start_soon(queued)
                await wait_until(lambda: sum(_load(runner)) == 3)
                engine.gate.set()
        finally:
            engine.gate.set()
        got.append(await _tokens(runner, _request(LATER, 8, seed=4)))
        await _until_freed(runner)
    assert [str(f) for f in failures] == ["generation failed: internal error"] * 2
    assert engine.failed_steps == [3]
    assert [len(abort.failed) for abort in engine.aborts] == [2]  # the two victims, no more
    assert got == fault_free


async def test_out_of_memory_answers_503_empties_the_prefix_cache_and_serves_on(
    folder: Path,
) -> None:
    async with (
        _real_tree(folder, at_steps({}), parallel=2) as (runner, engine),
        serve_app(create_app(runner, ApiConfig(model_name="fake"))) as (host, port),
    ):

        async def post(path: str, body: dict[str, Any], until: bytes = b"}") -> bytes:
            stream = await raw_request(host, port, "POST", path, body)
            answer = await read_until(stream, until, eof_ok=True)
            await stream.aclose()
            return answer

        first = {"prompt": "hello", "stream": False, "options": {"num_predict": 3}}
        assert (await post("/completion", first)).startswith(b"HTTP/1.1 200")
        await wait_until(lambda: runner.statistics().prefix_cache_entries == 1)
        # The next two requests run into an allocation failure two steps after they start.
        engine.plan = at_steps({engine.steps + 2: out_of_memory})
        engine.gate = threading.Event()
        try:
            whole = {"model": "fake", "prompt": "tell me", "stream": False}
            stream = {"model": "fake", "prompt": "tell me more", "max_tokens": 50, "stream": True}
            answers: dict[str, bytes] = {}
            async with trio.open_nursery() as nursery:

                async def ask(name: str, path: str, body: dict[str, Any], until: bytes) -> None:
                    answers[name] = await post(path, body, until)

                nursery.start_soon(ask, "whole", "/api/generate", whole, b"}")
                nursery.start_soon(ask, "stream", "/v1/completions", stream, b"0\r\n\r\n")
                await wait_until(lambda: sum(_load(runner)) == 2)
                engine.gate.set()
        finally:
            engine.gate.set()
        assert answers["whole"].startswith(b"HTTP/1.1 503"), answers["whole"]
        assert b"retry-after: 5" in answers["whole"].lower()
        assert b"out of memory" in answers["whole"]
        assert answers["stream"].startswith(b"HTTP/1.1 200")  # its header went out first
        assert b"out of memory" in answers["stream"]
        assert [len(abort.failed) for abort in engine.aborts] == [2]
        await _until_freed(runner)
        stats = runner.statistics()
        assert (stats.prefix_cache_entries, stats.cache_bytes) == (0, 0)
        health = await raw_request(host, port, "GET", "/health")
        assert (await read_until(health, b"}", eof_ok=True)).startswith(b"HTTP/1.1 200")
        await health.aclose()
        again = await post("/completion", first, b"}\n")
        assert again.startswith(b"HTTP/1.1 200")
        assert b'"eval_count":3' in again


def _load(runner: Runner) -> tuple[int, int]:
    stats = runner.statistics()
    return stats.active_sequences, stats.queued_requests


async def test_a_fault_that_keeps_repeating_ends_the_tree_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FaultInjectingEngine(ScriptedEngine(), from_step(1, engine_bug))
    load = scripted_load(engine, tokenizer())
    seen: list[str] = []

    async def fails(generation: Any) -> None:
        with generation, pytest.raises(GenerationError) as caught:
            await read_to_end(generation)
        seen.append(str(caught.value))

    with pytest.RaisesGroup(
        pytest.RaisesExc(EngineFaultError, match="3 failed engine steps in a row"),
        flatten_subgroups=True,
    ):
        async with open_test_runner(load=load, parallel=1) as client:
            for _ in range(2):  # two failures: the server goes on
                await fails(await client.runner.submit(_request(QUEUED, 5, seed=1)))
            assert client.runner.health().status == "ok"
            # The third ends it; the request queued behind it is told too.
            engine.gate = threading.Event()
            try:
                third = await client.runner.submit(_request(QUEUED, 5, seed=1))
                queued = await client.runner.submit(_request(LATER, 5, seed=1))
            finally:
                engine.gate.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fails, third)
                nursery.start_soon(fails, queued)
            await trio.sleep_forever()
    assert seen == ["generation failed: internal error"] * 4
    assert engine.failed_steps == [1, 2, 3]
    fatal = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert [r.getMessage() for r in fatal] == [
        "the engine keeps failing (3 failed engine steps in a row; the last: RuntimeError: "
        "injected engine fault); stopping"
    ]


async def test_an_admission_that_runs_out_of_memory_fails_that_request_alone(
    folder: Path,
) -> None:
    async with _real_tree(folder, at_steps({})) as (runner, engine):
        await _tokens(runner, _request(LATER, 3, seed=1))
        await wait_until(lambda: runner.statistics().prefix_cache_entries == 1)
        engine.admission = lambda r: out_of_memory() if r.prompt == QUEUED else None
        with pytest.raises(OutOfMemoryError):
            await _tokens(runner, _request(QUEUED, 3, seed=1))
        assert runner.statistics().prefix_cache_entries == 0  # what could be freed was
        assert len(await _tokens(runner, _request(VICTIMS[0], 3, seed=1))) == 3
        assert runner.ready is not None
        assert runner.ready.scheduler.counters.engine_faults == 1
        await _until_freed(runner)


async def test_an_embedding_that_fails_counts_as_an_engine_fault_and_fails_it_alone(
    folder: Path,
) -> None:
    """Out of memory: that request gets ``OutOfMemoryError`` and the prefix cache is emptied;
    a bug: ``GenerationError``; both count as engine faults, and generation serves on."""
    async with _real_tree(folder, at_steps({})) as (runner, engine):
        await _tokens(runner, _request(LATER, 3, seed=1))
        await wait_until(lambda: runner.statistics().prefix_cache_entries == 1)
        engine.embedding = lambda inputs: out_of_memory()
        with pytest.raises(OutOfMemoryError):
            await runner.embed(EmbedRequest(inputs=((5, 6, 7),)))
        assert runner.statistics().prefix_cache_entries == 0  # what could be freed was
        engine.embedding = lambda inputs: engine_bug()
        with pytest.raises(GenerationError, match="internal error"):
            await runner.embed(EmbedRequest(inputs=((5, 6, 7),)))
        assert runner.ready is not None
        assert runner.ready.scheduler.counters.engine_faults == 2
        engine.embedding = lambda inputs: None
        assert len((await runner.embed(EmbedRequest(inputs=((5, 6, 7),)))).vectors) == 1
        assert len(await _tokens(runner, _request(VICTIMS[0], 3, seed=1))) == 3


SERVE_WITH_FAULTS = textwrap.dedent(
    """
    import sys
    from actors.testing import ScriptedEngine, scripted_load, tiny_tokenizer
    from cli.main import build_parser
    from cli.serve import main
    from runtime.testing.faults import FaultInjectingEngine, engine_bug, from_step

    engine = FaultInjectingEngine(ScriptedEngine(), from_step(1, engine_bug))
    args = build_parser().parse_args(["serve", "--model", "fake", "--port", "0"])
    sys.exit(main(args, load=scripted_load(engine, tiny_tokenizer())))
    """
)


async def test_serve_exits_1_with_one_line_when_the_engine_keeps_failing() -> None:
    async with server_process(sys.executable, "-c", SERVE_WITH_FAULTS) as (process, port, err):
        with trio.fail_after(30):  # load guard
            while b'"ok"' not in await get("/health", port):
                await trio.sleep(0.01)
        body = {"prompt": "x", "stream": False, "options": {"num_predict": 4}}
        for i in range(3):
            stream = await raw_request("127.0.0.1", port, "POST", "/completion", body)
            answer = await read_until(stream, b"}", eof_ok=True)
            await stream.aclose()
            if i < 2:  # the last may be cut short as the server stops
                assert answer.startswith(b"HTTP/1.1 500"), answer
        with trio.fail_after(30):  # hang guard
            code = await process.wait()
    stderr = b"".join(err).decode()
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if "keeps failing" in line]
    assert len(lines) == 1, stderr
    assert "3 failed engine steps in a row" in lines[0]
    assert "Exception Group" not in stderr  # the exit is that line, not a dump of the tree
