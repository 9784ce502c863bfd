"""The actor tree on a tiny real model: batching and cancellation never change a request's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from actors.messages import DoneReason, GenerateRequest, GenerationOptions
from actors.runner import Runner
from actors.testing import read_to_end, receive_chunk
from actors.tree import open_runner
from runtime.engine.options import SamplingOptions
from runtime.testing.models import make_tiny_folder

SEEDED = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=11)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "qwen3")


def _request(prompt: str, n: int) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, options=GenerationOptions(sampling=SEEDED, num_predict=n))


async def _tokens(runner: Runner, request: GenerateRequest) -> list[int]:
    with await runner.submit(request) as generation:
        got = await read_to_end(generation)
    return [t for c in got for t in c.tokens]


async def test_a_cancelled_neighbour_does_not_change_tokens(folder: Path) -> None:
    async with open_runner(model=str(folder), parallel=4, prefill_chunk=16) as runner:
        await runner.wait_ready()
        alone = await _tokens(runner, _request("Once upon a time", 24))
        assert len(alone) > 0

        together: list[int] = []

        async def main_request() -> None:
            together.extend(await _tokens(runner, _request("Once upon a time", 24)))

        async def neighbour_that_leaves() -> None:
            with await runner.submit(_request("The quick brown fox " * 6, 200)) as generation:
                for _ in range(3):
                    await receive_chunk(generation)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(neighbour_that_leaves)
            nursery.start_soon(main_request)
        assert together == alone
        with trio.fail_after(30):  # hang guard: the leaver's sequence must be freed
            while runner.statistics().active_sequences:
                await trio.sleep(0.01)
        stats = runner.statistics()
        assert stats.cache_bytes == stats.prefix_cache_bytes  # the batch gave its rows back


async def test_real_model_streams_to_the_end(folder: Path) -> None:
    async with open_runner(model=str(folder)) as runner:
        await runner.wait_ready()
        assert runner.model_info().model_type == "qwen3"
        with await runner.submit(_request("Hello", 5)) as generation:
            got = await read_to_end(generation)
        assert got[-1].done
        assert got[-1].done_reason in (DoneReason.LENGTH, DoneReason.STOP)
        assert got[-1].eval_count <= 5
