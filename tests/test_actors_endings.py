"""How generations end when they cannot finish, driven through actors.testing (no HTTP).

Shutdown cuts what runs past the grace period and ends what is still queued at once (never
admitted); a second signal cuts everything now; a reader that stops reading pauses its
sequence, then loses it; open generations are bounded; and the scheduler forgets every
sequence that ended once the engine has removed it. Every cut ends with a ``GenerationCut``,
never with a done chunk.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import trio
import trio.testing

from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    Generation,
    GenerationCut,
    GenerationOptions,
    OverloadedError,
)
from actors.runner import Runner
from actors.scheduler import STEPS_PER_JOB, Scheduler
from actors.testing import (
    ScriptedEngine,
    open_test_runner,
    read_to_end,
    receive_chunk,
    tiny_tokenizer,
)
from actors.tree import drain
from tests.waits import wait_until

TOK = tiny_tokenizer()
PAUSE = 16  # unread tokens that pause a sequence in these tests
# What a reader that never reads can be left holding: the pause bound, the steps of the
# engine job that was running when it was crossed, and the token in flight.
MOST_UNREAD = PAUSE + STEPS_PER_JOB + 2


def _request(prompt: str = "Hello", num_predict: int = 5) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, options=GenerationOptions(num_predict=num_predict))


def _long_engine() -> ScriptedEngine:
    return ScriptedEngine(context_length=100_000)


def _scheduler(runner: Runner) -> Scheduler:
    assert runner.ready is not None
    return runner.ready.scheduler


async def _read_until_cut(generation: Generation) -> tuple[list[Chunk], GenerationCut]:
    """Every chunk up to the cut that must end ``generation``, and the cut."""
    chunks: list[Chunk] = []
    async for item in generation.chunks:
        if isinstance(item, GenerationCut):
            assert not any(c.done for c in chunks)  # never a done chunk before the cut
            return chunks, item
        assert isinstance(item, Chunk)
        chunks.append(item)
    raise AssertionError("the generation ended without a GenerationCut")


# ---- shutdown ----


async def test_requests_queued_when_shutdown_begins_end_at_once_never_admitted() -> None:
    engine = _long_engine()
    engine.gate = threading.Event()  # the running generation's steps wait for the test
    async with open_test_runner(engine, parallel=1, tokenizer=TOK) as client:
        runner = client.runner
        try:
            with (
                await runner.submit(_request("running")) as running,
                await runner.submit(_request("queued")) as queued,
            ):
                await wait_until(lambda: client.statistics().queued_requests == 1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain, runner, 600.0)
                    # Answered while the running one is still stuck in its first step.
                    chunks, cut = await _read_until_cut(queued)
                    assert chunks == []
                    assert "never started" in str(cut)
                    assert cut.final.done_reason is DoneReason.CANCELLED
                    engine.gate.set()
                    finished = await read_to_end(running)  # within the grace period
                assert finished[-1].done_reason is DoneReason.LENGTH
        finally:
            engine.gate.set()
        assert runner.stopped.is_set()
    assert len(engine.added) == 1  # the queued one never reached the engine


async def test_a_second_signal_cuts_open_generations_with_an_error() -> None:
    async with open_test_runner(
        _long_engine(), handle_signals=True, grace=600.0, tokenizer=TOK
    ) as client:
        with await client.runner.submit(_request(num_predict=50_000)) as generation:
            await receive_chunk(generation)
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_until(lambda: client.runner.health().status == "shutting_down")
            await receive_chunk(generation)  # draining: it goes on
            os.kill(os.getpid(), signal.SIGTERM)
            _, cut = await _read_until_cut(generation)
        assert "stopping now" in str(cut)
        assert cut.final.eval_count > 0
        assert client.runner.stopped.is_set()  # the HTTP server is asked to stop
        # A third signal does not wait for responses to flush: the tree cancels this body.
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(10):  # hang guard
            await trio.sleep_forever()


# ---- readers that lag ----


async def test_a_reader_that_stops_reading_pauses_only_its_own_sequence() -> None:
    engine = _long_engine()
    async with open_test_runner(engine, reader_pause_tokens=PAUSE, tokenizer=TOK) as client:
        with await client.runner.submit(_request("lagging", num_predict=300)) as lagging:
            await wait_until(lambda: bool(engine.added))
            seq_id = engine.added[0]
            # Another stream runs to its end while this one is not read at all.
            _, done = await client.generate_text(
                "other", options=GenerationOptions(num_predict=200)
            )
            assert done.done_reason is DoneReason.LENGTH
            assert done.eval_count == 200
            await wait_until(lambda: client.statistics().paused_sequences == 1)
            produced = engine.seqs[seq_id].produced
            assert PAUSE <= produced <= MOST_UNREAD  # bounded, and long before its 300
            assert (seq_id, True) in [p[:2] for p in engine.pauses]
            # The reader comes back: the sequence goes on, and nothing was lost.
            chunks = await read_to_end(lagging)
        assert sum(len(c.tokens) for c in chunks) == 300
        assert chunks[-1].done_reason is DoneReason.LENGTH
        assert (seq_id, False) in [p[:2] for p in engine.pauses]
        assert client.statistics().paused_sequences == 0


async def test_text_held_for_a_stop_string_never_pauses_a_reader_that_reads() -> None:
    spelled = "a" * 30 + "b done"  # 30 tokens that may still become the stop string
    engine = ScriptedEngine(lambda request: TOK.encode(spelled))
    async with open_test_runner(engine, reader_pause_tokens=4, tokenizer=TOK) as client:
        options = GenerationOptions(stop=("a" * 40,))
        with trio.fail_after(10):  # hang guard: paused, it would wait for its reader for good
            text, last = await client.generate_text("Hi", options=options)
    assert text == spelled
    assert last.done_reason is DoneReason.LENGTH


async def test_a_stalled_reader_loses_its_sequence_after_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = _long_engine()
    async with open_test_runner(
        engine, reader_pause_tokens=PAUSE, reader_timeout=60.0, tokenizer=TOK
    ) as client:
        with await client.runner.submit(_request("stalled", num_predict=50_000)) as stalled:
            await wait_until(lambda: client.statistics().paused_sequences == 1)
            seq_id = engine.added[0]
            await trio.sleep(30)  # virtual time: paused, within its bound
            assert seq_id not in engine.removed
            assert client.statistics().paused_sequences == 1
            await trio.sleep(31)  # past it: cancelled, and its cache freed
            await wait_until(lambda: seq_id in engine.removed)
            await wait_until(lambda: client.statistics().cache_bytes == 0)
            stats = client.statistics()
            assert (stats.active_sequences, stats.paused_sequences) == (0, 0)
            assert stats.cancelled_total == 1
            # Were the reader to come back, it finds what was held for it, then the cut.
            chunks, cut = await _read_until_cut(stalled)
        assert "stopped reading" in str(cut)
        tokens = sum(len(c.tokens) for c in chunks)
        assert PAUSE <= tokens <= MOST_UNREAD
        longest = max(len(TOK.piece(token).encode()) for token in range(TOK.vocab_size))
        assert len("".join(c.content for c in chunks).encode()) <= MOST_UNREAD * longest


# ---- bounds ----


async def test_open_generations_are_bounded_even_when_finished_but_unread() -> None:
    async with open_test_runner(_long_engine(), max_open=2, tokenizer=TOK) as client:
        runner = client.runner
        with await runner.submit(_request("a", 2)) as first, await runner.submit(_request("b", 2)):
            # Both finish in the engine, but their readers have not taken their last chunks.
            await wait_until(lambda: client.statistics().requests_total == 2)
            await wait_until(lambda: client.statistics().active_sequences == 0)
            assert client.statistics().open_generations == 2
            with pytest.raises(OverloadedError, match="too many generations"):
                await runner.submit(_request("c"))
            await read_to_end(first)
            _, last = await client.generate_text("c", options=GenerationOptions(num_predict=2))
            assert last.eval_count == 2
        await wait_until(lambda: client.statistics().open_generations == 0)


# ---- the withdrawn set ----


async def test_the_withdrawn_set_is_empty_after_a_storm_of_cancellations() -> None:
    engine = _long_engine()
    async with open_test_runner(engine, parallel=4, max_queue=128, tokenizer=TOK) as client:
        scheduler = _scheduler(client.runner)

        async def leave_after(chunks: int) -> None:
            with await client.runner.submit(_request(f"p{chunks}", 1000)) as generation:
                for _ in range(chunks):
                    await receive_chunk(generation)

        async with trio.open_nursery() as nursery:
            for i in range(120):
                nursery.start_soon(leave_after, i % 4)
        await wait_until(lambda: client.statistics().active_sequences == 0)
        assert client.statistics().queued_requests == 0
        assert scheduler.withdrawn == frozenset()
        assert engine.seqs == {}


async def test_the_withdrawn_set_is_empty_after_a_drain() -> None:
    engine = _long_engine()
    async with open_test_runner(engine, parallel=2, tokenizer=TOK) as client:
        runner = client.runner
        scheduler = _scheduler(runner)
        cuts: list[GenerationCut] = []

        async def read(generation: Generation) -> None:
            with generation:
                cuts.append((await _read_until_cut(generation))[1])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(4):  # two running, two queued
                    nursery.start_soon(read, await runner.submit(_request(f"p{i}", 50_000)))
                await wait_until(lambda: client.statistics().queued_requests == 2)
                engine.gate = threading.Event()  # the engine gets stuck in its next step
                await wait_until(engine.at_gate.is_set)  # and is: no removal job can run
                nursery.start_soon(drain, runner, 0.0)
                await wait_until(lambda: len(cuts) == 4)  # every reader was told at once
                await trio.testing.wait_all_tasks_blocked()
                # Not stopped while the engine still holds sequences that ended.
                assert scheduler.withdrawn
                assert not runner.stopped.is_set()
                engine.gate.set()
                await runner.stopped.wait()
                assert scheduler.withdrawn == frozenset()
                assert engine.seqs == {}
        finally:
            if engine.gate is not None:
                engine.gate.set()
        assert client.statistics().active_sequences == 0


async def test_closing_the_tree_removes_every_open_sequence_from_the_engine() -> None:
    engine = _long_engine()
    async with open_test_runner(engine, parallel=2, tokenizer=TOK) as client:
        scheduler = _scheduler(client.runner)
        open_ = [await client.runner.submit(_request(f"p{i}", 50_000)) for i in range(3)]
        await wait_until(lambda: len(engine.seqs) == 2)
    # The tree was cancelled with sequences running: they ended and the engine removed them.
    assert scheduler.withdrawn == frozenset()
    assert (scheduler.active, scheduler.queued) == (0, 0)
    assert engine.seqs == {}
    for generation in open_:
        generation.close()
