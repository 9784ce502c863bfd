"""The actor tree driven without HTTP, through actors.testing."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import attrs
import pytest
import trio

from actors.config import Loaded
from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    GenerationCut,
    GenerationError,
    GenerationOptions,
    QueueFullError,
    UnavailableError,
)
from actors.pipeline import chunk_tokens
from actors.runner import Runner
from actors.testing import (
    ScriptedEngine,
    count_up,
    fake_info,
    open_test_runner,
    read_to_end,
    receive_chunk,
    scripted_load,
    tiny_tokenizer,
)
from actors.tree import drain
from runtime.engine.protocol import SequenceRequest
from runtime.errors import PromptError
from runtime.text.stops import StopMatcher
from tests.waits import wait_until

TOK = tiny_tokenizer()


def _ids(text: str) -> list[int]:
    return TOK.encode(text)


def _spell(text: str) -> Callable[[SequenceRequest], list[int]]:
    return lambda request: _ids(text)


def _request(prompt: str = "Hello", **options: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, options=GenerationOptions(**options))  # type: ignore[arg-type]


async def test_generation_streams_detokenized_text_and_totals() -> None:
    engine = ScriptedEngine(_spell(" the capital of France is Paris"))
    async with open_test_runner(engine) as client:
        text, last = await client.generate_text("Hi")
    assert text == " the capital of France is Paris"
    assert last.done
    assert last.done_reason is DoneReason.LENGTH
    assert last.eval_count == len(_ids(" the capital of France is Paris"))
    assert last.prompt_eval_count == len(_ids("Hi"))
    assert last.total_duration >= last.eval_duration >= 0


async def test_every_engine_call_runs_on_one_thread() -> None:
    engine = ScriptedEngine()
    async with open_test_runner(engine) as client, trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(client.generate, _request(f"p{i}", num_predict=5))
    assert len(engine.threads) == 1
    assert threading.get_ident() not in engine.threads


async def test_scheduler_accepts_only_after_the_loader_is_ready() -> None:
    release = threading.Event()
    reported = trio.Event()
    token = trio.lowlevel.current_trio_token()
    engine = ScriptedEngine()

    def slow_load(progress: Callable[[float], None]) -> Loaded:
        progress(0.25)
        trio.from_thread.run_sync(reported.set, trio_token=token)
        release.wait()
        return Loaded(engine=engine, tokenizer=TOK, info=fake_info())

    async with open_test_runner(engine, load=slow_load, wait_ready=False) as client:
        with trio.fail_after(10):  # hang guard
            await reported.wait()
        health = client.runner.health()
        assert health.status == "loading"
        assert health.progress == 0.25
        with pytest.raises(UnavailableError) as info:
            await client.runner.submit(_request())
        assert info.value.state == "loading"
        release.set()
        await client.runner.wait_ready()
        assert client.runner.health().status == "ok"
        _, last = await client.generate_text("Hi", options=GenerationOptions(num_predict=2))
        assert last.eval_count == 2


async def test_queue_full_is_rejected_at_once() -> None:
    engine = ScriptedEngine()
    engine.gate = threading.Event()
    async with open_test_runner(engine, parallel=1, max_queue=1) as client:
        try:
            with await client.runner.submit(_request()):
                await trio.testing.wait_all_tasks_blocked()  # admitted; its step waits
                assert client.statistics().active_sequences == 1
                with await client.runner.submit(_request()):
                    assert client.statistics().queued_requests == 1
                    with pytest.raises(QueueFullError, match="queue is full"):
                        await client.runner.submit(_request())
        finally:
            engine.gate.set()


async def test_closing_the_handle_frees_the_sequence_within_one_step() -> None:
    engine = ScriptedEngine()
    async with open_test_runner(engine) as client:
        with await client.runner.submit(_request(num_predict=100)) as generation:
            for _ in range(2):
                await generation.chunks.receive()
            seq_id = engine.added[-1]
            steps_at_close = engine.steps  # a step may be running: it may finish
        await wait_until(lambda: seq_id in engine.removed)
        assert engine.removed_at_step[seq_id] <= steps_at_close + 1
        await wait_until(lambda: client.statistics().active_sequences == 0)
        assert client.statistics().cancelled_total == 1
        assert not engine.seqs  # nothing is left that a step could compute
        with pytest.raises(trio.ClosedResourceError):
            await generation.chunks.receive()


async def test_a_dropped_handle_is_closed_when_collected() -> None:
    engine = ScriptedEngine()
    engine.gate = threading.Event()
    async with open_test_runner(engine) as client:
        try:
            generation = await client.runner.submit(_request(num_predict=100))
            await trio.testing.wait_all_tasks_blocked()
            del generation  # as when a response is dropped before its body is read
            await trio.testing.wait_all_tasks_blocked()  # the loop ran the close
        finally:
            engine.gate.set()
        # Left open, the sequence would run its 100 tokens and count as finished.
        await wait_until(lambda: client.statistics().active_sequences == 0)
        assert client.statistics().cancelled_total == 1


async def test_a_request_that_leaves_while_queued_never_runs() -> None:
    engine = ScriptedEngine()
    engine.gate = threading.Event()
    async with open_test_runner(engine, parallel=1) as client:
        try:
            with await client.runner.submit(_request()):
                await trio.testing.wait_all_tasks_blocked()  # admitted; its step waits
                with await client.runner.submit(_request("queued")):
                    assert client.statistics().queued_requests == 1
                # Closing the handle freed the queue slot at once, with no checkpoint between.
                assert client.statistics().queued_requests == 0
        finally:
            engine.gate.set()
        # Had the queued one been admitted, it would be running, or recorded as added.
        await wait_until(
            lambda: (
                client.statistics().queued_requests == 0
                and client.statistics().active_sequences == 0
            )
        )
    assert len(engine.added) == 1


async def test_a_sequence_the_engine_rejects_fails_alone() -> None:
    def script(request: SequenceRequest) -> list[int]:
        if len(request.prompt) > 8:
            raise ValueError("no room for this one")
        return count_up(request)

    async with open_test_runner(ScriptedEngine(script)) as client:
        with pytest.raises(GenerationError, match="no room for this one"):
            await client.generate(_request("word " * 10))
        _, last = await client.generate_text("Hi", options=GenerationOptions(num_predict=2))
        assert last.eval_count == 2


async def test_closing_the_tree_ends_open_generations_and_admission() -> None:
    async with open_test_runner(ScriptedEngine()) as client:
        generation = await client.runner.submit(_request(num_predict=50))
        await receive_chunk(generation)
    # No done chunk: whoever reads this reports it as cancelled, never as a success.
    with pytest.raises(trio.EndOfChannel):
        await generation.chunks.receive()
    with pytest.raises(UnavailableError):
        await client.runner.submit(_request())


async def test_stop_string_across_token_boundaries_is_never_emitted() -> None:
    engine = ScriptedEngine(_spell("Hello wor" + "ld! STOP and more"))
    async with open_test_runner(engine) as client:
        chunks = await client.generate(_request(stop=("world!", "zzz")))
    text = "".join(c.content for c in chunks)
    assert text == "Hello "
    assert chunks[-1].done_reason is DoneReason.STOP
    assert all("wor" not in c.content for c in chunks)


def test_stop_matcher_holds_only_possible_prefixes() -> None:
    m = StopMatcher(("</s>",))
    assert m.feed("a<") == ("a", False)
    assert m.feed("/x") == ("</x", False)
    assert m.feed("b</") == ("b", False)
    assert m.feed("s> tail") == ("", True)
    m2 = StopMatcher(("abc",))
    assert m2.feed("ab") == ("", False)
    assert m2.flush() == "ab"


async def test_num_predict_and_context_clamp() -> None:
    engine = ScriptedEngine(context_length=32)
    async with open_test_runner(engine) as client:
        _, last = await client.generate_text("Hi", options=GenerationOptions(num_predict=3))
        assert last.eval_count == 3
        assert last.done_reason is DoneReason.LENGTH
        prompt = "word " * 8
        n_prompt = len(_ids(prompt))
        await client.generate(_request(prompt, num_predict=1000))
        assert engine_max_tokens(engine) == 32 - n_prompt
        with pytest.raises(PromptError, match="exceeds the context"):
            await client.generate(_request("word " * 40))


def engine_max_tokens(engine: ScriptedEngine) -> int:
    return engine.last_request.max_tokens


async def test_eos_ends_with_stop_and_is_not_shown() -> None:
    eos = min(TOK.eos_ids)
    engine = ScriptedEngine(lambda r: [*_ids("done"), eos, *_ids(" never")], eos=eos)
    async with open_test_runner(engine) as client:
        text, last = await client.generate_text("Hi")
    assert text == "done"
    assert last.done_reason is DoneReason.STOP
    assert last.eval_count == len(_ids("done"))


async def test_drain_lets_short_work_finish_and_cancels_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = ScriptedEngine()
    async with open_test_runner(engine) as client:
        runner = client.runner
        _, finished = await client.generate_text("Hi", options=GenerationOptions(num_predict=3))
        assert finished.done_reason is DoneReason.LENGTH
        engine.gate = threading.Event()  # the next generation is stuck in the engine
        try:
            await _drain_stuck(runner)
        finally:
            engine.gate.set()


async def _drain_stuck(runner: Runner) -> None:
    with await runner.submit(_request(num_predict=50)) as generation:
        # Admitted (its first step is stuck), so the drain cuts it rather than refusing it.
        await wait_until(
            lambda: (s := runner.statistics()).active_sequences == 1 and s.queued_requests == 0
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, runner, 5.0)
            await trio.testing.wait_all_tasks_blocked()
            assert runner.health().status == "shutting_down"
            with pytest.raises(UnavailableError):
                await runner.submit(_request())
            rest = [c async for c in generation.chunks]
        last = rest[-1]
        # Cut by the deadline: an error that says so, never a done chunk.
        assert isinstance(last, GenerationCut)
        assert "cut short" in str(last)
        assert last.final.done_reason is DoneReason.CANCELLED
        assert not any(isinstance(c, Chunk) and c.done for c in rest)
    await runner.stopped.wait()


async def test_sigterm_drains_then_stops() -> None:
    engine = ScriptedEngine()
    async with open_test_runner(engine, handle_signals=True, grace=5.0) as client:
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(10):
            await client.runner.stopped.wait()
        assert client.runner.health().status == "shutting_down"


async def test_tokenize_and_info_need_a_ready_model() -> None:
    engine = ScriptedEngine()
    async with open_test_runner(engine, load=scripted_load(engine, TOK)) as client:
        assert await client.runner.tokenize("Hello") == _ids("Hello")
        assert await client.runner.detokenize(_ids("Hello")) == "Hello"
        assert client.runner.model_info().context_length == 256


async def test_a_load_failure_ends_the_tree_with_the_error() -> None:
    from runtime.errors import ModelLoadError

    def broken(progress: Callable[[float], None]) -> Loaded:
        raise ModelLoadError("model.safetensors: tensor 'x' missing")

    with pytest.RaisesGroup(pytest.RaisesExc(ModelLoadError, match="tensor 'x' missing")):
        async with open_test_runner(load=broken, wait_ready=False) as client:
            await client.runner.wait_ready()


async def test_an_abandoned_job_does_not_hold_the_caller() -> None:
    from actors.engine_thread import EngineThread

    thread = EngineThread()
    started = threading.Event()
    release = threading.Event()

    def job() -> None:
        started.set()
        release.wait()

    scope = trio.CancelScope()

    async def call() -> None:
        with scope:
            await thread.run(job, abandon_on_cancel=True)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait)  # the job runs on the engine thread
            scope.cancel()
        assert scope.cancelled_caught  # the caller left while the job still runs
        assert thread.abandoned_running
    finally:
        release.set()
        thread.stop()
        assert await trio.to_thread.run_sync(thread.join, 5.0)
    assert not thread.abandoned_running


def test_a_request_gets_the_default_context_unless_it_asks_for_more() -> None:
    from actors.pipeline import DEFAULT_CONTEXT, prepare
    from actors.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    plain = prepare(_request("hi"), tokenizer, model_context=32_768)
    assert plain.context_length == DEFAULT_CONTEXT
    wide = _request("hi")
    wide = attrs.evolve(wide, options=attrs.evolve(wide.options, num_ctx=10_000))
    assert prepare(wide, tokenizer, model_context=32_768).context_length == 10_000
    huge = attrs.evolve(wide, options=attrs.evolve(wide.options, num_ctx=10**6))
    assert prepare(huge, tokenizer, model_context=32_768).context_length == 32_768


async def test_a_lagging_reader_gets_the_waiting_tokens_in_fewer_chunks() -> None:
    words = " one two three four five six seven eight nine ten"
    engine = ScriptedEngine(_spell(words))
    async with open_test_runner(engine) as client:
        with await client.runner.submit(_request("Hi")) as generation:
            # Read nothing until every token has been routed to the pipeline.
            await wait_until(lambda: client.statistics().generated_tokens_total == len(_ids(words)))
            chunks = await read_to_end(generation)
    assert "".join(c.content for c in chunks) == words  # nothing lost or doubled
    assert sum(len(c.tokens) for c in chunks) == len(_ids(words))
    assert len(chunks) < len(_ids(words))  # held text went out together
    assert chunks[-1].done


async def test_stream_interval_gathers_that_many_tokens_per_chunk() -> None:
    words = " one two three four five six seven eight nine ten"
    engine = ScriptedEngine(_spell(words))
    async with open_test_runner(engine, stream_interval=3) as client:
        chunks = await client.generate(_request("Hi"))
    assert "".join(c.content for c in chunks) == words
    assert sum(len(c.tokens) for c in chunks) == len(_ids(words))
    # The first token goes at once (time to first token); every later chunk but the done one
    # (which takes the rest) carries at least 3 tokens, and a lagging reader may get more.
    assert len(chunks[0].tokens) == 1
    assert all(len(c.tokens) >= 3 for c in chunks[1:-1])
    assert chunks[-1].done


def test_auto_chunks_grow_by_one_token_per_sixteen_running_streams() -> None:
    assert [chunk_tokens(None, n) for n in (0, 1, 16, 17, 32, 33, 64)] == [1, 1, 1, 2, 2, 3, 4]
    # A set interval is kept, whatever runs.
    assert chunk_tokens(3, 64) == 3
    assert chunk_tokens(1, 64) == 1


async def test_auto_interval_follows_the_running_streams() -> None:
    """Unset (``auto``), the pipeline asks how many streams run at each chunk: with 17 held
    running, chunks after the first gather 2 tokens; alone, each token goes at once."""
    words = " one two three four five six seven eight nine ten"
    engine = ScriptedEngine(_spell(words))
    async with open_test_runner(engine) as client:
        alone = await client.generate(_request("Hi"))
        scheduler = client.runner.ready.scheduler if client.runner.ready else None
        assert scheduler is not None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(scheduler), "active", property(lambda self: 17))
            crowded = await client.generate(_request("Hi"))
    assert any(len(c.tokens) == 1 for c in alone[1:-1])  # nothing gathered for one stream
    assert "".join(c.content for c in crowded) == words
    assert len(crowded[0].tokens) == 1
    assert all(len(c.tokens) >= 2 for c in crowded[1:-1])
    assert len(crowded) < len(alone)
