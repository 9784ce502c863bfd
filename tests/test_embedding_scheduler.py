"""Embeddings in the scheduler: chunks interleave with generation steps (a long batch never
stops a running generation), the queue's order, bounds and withdrawals, and shutdown."""

from __future__ import annotations

import threading

import pytest
import trio

from actors.messages import (
    EmbedRequest,
    GenerateRequest,
    GenerationError,
    GenerationOptions,
    OutOfMemoryError,
    QueueFullError,
    UnavailableError,
)
from actors.scheduler_embeddings import EmbeddingRequests
from actors.scheduler_records import EmbeddingWork
from actors.testing import ScriptedEngine, open_test_runner, read_to_end
from runtime.engine.embedding import EMBED_CHUNK_TOKENS
from runtime.errors import PromptError
from runtime.scheduling.embeddings import EmbedChunk, EmbeddingQueue, EmbeddingQueueFull
from tests.waits import wait_until


def test_the_queue_serves_requests_in_order_a_chunk_at_a_time() -> None:
    queue = EmbeddingQueue[str](max_requests=2, chunk_tokens=10)
    queue.push("a", [6, 6, 6])
    queue.push("b", [1])
    with pytest.raises(EmbeddingQueueFull):
        queue.push("c", [1])
    assert queue.pop() == EmbedChunk("a", range(0, 1), last=False)
    assert queue.pop() == EmbedChunk("a", range(1, 2), last=False)
    assert queue.pop() == EmbedChunk("a", range(2, 3), last=True)
    assert queue.pop() == EmbedChunk("b", range(0, 1), last=True)
    assert queue.pop() is None


def test_a_withdrawn_request_leaves_its_chunks_behind() -> None:
    queue = EmbeddingQueue[str](max_requests=4, chunk_tokens=1)
    queue.push("a", [1, 1, 1])
    queue.push("b", [1])
    assert queue.pop() == EmbedChunk("a", range(0, 1), last=False)
    queue.withdraw("a")
    assert queue.pop() == EmbedChunk("b", range(0, 1), last=True)
    assert len(queue) == 0


def test_a_failed_chunk_fails_its_request_and_hands_back_only_engine_faults() -> None:
    requests = EmbeddingRequests(max_requests=4)
    works = [EmbeddingWork(inputs=((1,),), normalize=False, dimensions=None) for _ in range(4)]
    for work in works:
        requests.submit(work)
    refused, out_of_memory, crash = PromptError("bad input"), MemoryError(), RuntimeError("bug")
    for chunk_result, fault in [(refused, None), (out_of_memory, out_of_memory), (crash, crash)]:
        chunk = requests.next_chunk()
        assert chunk is not None
        assert requests.finish(chunk, chunk_result) is fault
    assert works[0].error is refused  # the engine's input error, as it is
    assert isinstance(works[1].error, OutOfMemoryError)
    assert type(works[2].error) is GenerationError
    chunk = requests.next_chunk()
    assert chunk is not None
    assert requests.finish(chunk, [[0.5]]) is None
    assert works[3].done.is_set()
    assert works[3].vectors == [[0.5]]
    assert works[3].error is None
    assert len(requests) == 0


def _generation(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(tokens=(1, 2, 3), options=GenerationOptions(num_predict=max_tokens))


async def test_a_long_embedding_batch_interleaves_with_a_running_generation() -> None:
    engine = ScriptedEngine(context_length=256)
    engine.gate = threading.Event()  # the first step waits until the embedding is queued
    async with open_test_runner(engine) as harness:
        runner = harness.runner
        assert runner.ready is not None
        scheduler = runner.ready.scheduler
        generation = await runner.submit(_generation(100))
        await wait_until(lambda: bool(engine.added), "the generation's first step starts")
        inputs = tuple(tuple([7] * 200) for _ in range(4 * EMBED_CHUNK_TOKENS // 200))
        result: list[list[list[float]]] = []

        async def embed() -> None:
            embedded = await runner.embed(EmbedRequest(inputs=inputs, normalize=False))
            result.append(embedded.vectors)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(embed)
            try:
                await wait_until(lambda: scheduler.queued_embeddings == 1, "the batch is queued")
            finally:
                engine.gate.set()
        chunks = engine.embedded
        assert len(chunks) >= 4
        # One generation step between consecutive chunks: the generation never waits for
        # the whole batch.
        steps = [before for _, before in chunks]
        assert steps == list(range(steps[0], steps[0] + len(chunks)))
        assert sum(len(c) for c, _ in chunks) == len(inputs)
        assert all(sum(map(len, c)) <= EMBED_CHUNK_TOKENS for c, _ in chunks)
        assert result[0] == [[200.0, 1400.0, 7.0]] * len(inputs)
        with generation:
            chunks_out = await read_to_end(generation)
        assert chunks_out[-1].eval_count == 100


async def test_inputs_longer_than_the_context_are_cut_or_refused() -> None:
    async with open_test_runner(ScriptedEngine(context_length=64)) as harness:
        runner = harness.runner
        long = tuple(range(1, 101))
        cut = await runner.embed(EmbedRequest(inputs=(long,), normalize=False))
        assert cut.prompt_tokens == 64
        assert cut.vectors == [[64.0, float(sum(range(1, 65))), 1.0]]
        with pytest.raises(Exception, match="exceeds the context length"):
            await runner.embed(EmbedRequest(inputs=(long,), truncate=False))


async def test_a_full_queue_refuses_and_stopping_fails_the_queued_with_503() -> None:
    engine = ScriptedEngine()
    engine.gate = threading.Event()
    async with open_test_runner(engine, max_queue=1) as harness:
        runner = harness.runner
        assert runner.ready is not None
        scheduler = runner.ready.scheduler
        generation = await runner.submit(_generation(10))
        await wait_until(lambda: bool(engine.added), "a step holds the engine")
        errors: list[BaseException] = []

        async def embed() -> None:
            try:
                await runner.embed(EmbedRequest(inputs=((1, 2),)))
            except UnavailableError as exc:
                errors.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(embed)
                await wait_until(lambda: scheduler.queued_embeddings == 1, "queued")
                with pytest.raises(QueueFullError):
                    await runner.embed(EmbedRequest(inputs=((3,),)))
                scheduler.refuse_queued("the server is stopping")
        finally:
            engine.gate.set()
        generation.close()
        assert len(errors) == 1
        assert scheduler.queued_embeddings == 0
