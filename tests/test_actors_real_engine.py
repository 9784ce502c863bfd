"""The actor tree over a tiny real ``ModelEngine``: one thread, prefill cancellation, memory, ``run``.

Complements tests/test_actors_model.py (a neighbour leaving mid-decode).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

from actors.config import Loaded
from actors.messages import GenerateRequest, GenerationOptions
from actors.runner import Runner
from actors.testing import fake_info, read_to_end, receive_chunk
from actors.tree import open_runner
from cli import run as run_command
from cli.main import build_parser
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import EngineStats, SequenceRequest, StepAbort, TokenEvent
from runtime.models.loader import load_model
from runtime.testing.engine_wrapper import DelegatingEngine
from runtime.testing.models import make_tiny_folder

PROMPT = (5, 17, 99, 3, 250, 41, 7)
NEIGHBOUR_PROMPT = tuple(range(20, 220))  # 25 prefill chunks of 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama")


class RecordingEngine(DelegatingEngine):
    """``ModelEngine`` plus a record of the threads it ran on and the batches it stepped."""

    def __init__(self, inner: ModelEngine, threads: set[int]) -> None:
        super().__init__(inner)
        self.inner: ModelEngine = inner
        self.threads = threads
        self.removed: list[int] = []
        # (seq_id, whether it was still reading its prompt, active sequences before removal)
        self.removals: list[tuple[int, bool, int]] = []
        self.largest_batch = 0
        self.steps = 0

    def embed(
        self, inputs: Sequence[Sequence[int]], *, normalize: bool, dimensions: int | None = None
    ) -> list[list[float]]:
        self.threads.add(threading.get_ident())
        return self.inner.embed(inputs, normalize=normalize, dimensions=dimensions)

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        self.inner.close()

    def add(self, request: SequenceRequest) -> None:
        self.threads.add(threading.get_ident())
        self.inner.add(request)

    def remove(self, seq_id: int, *, save_as: int | None = None) -> int:
        self.threads.add(threading.get_ident())
        self.removed.append(seq_id)
        row = self.inner._by_id.get(seq_id)  # private, read on the engine thread
        prefilling = row is not None and bool(row.pending)
        self.removals.append((seq_id, prefilling, self.inner.statistics().active_sequences))
        return self.inner.remove(seq_id, save_as=save_as)

    def has_work(self) -> bool:
        self.threads.add(threading.get_ident())
        return self.inner.has_work()

    def step(self) -> list[TokenEvent]:
        self.threads.add(threading.get_ident())
        self.largest_batch = max(self.largest_batch, self.inner.statistics().active_sequences)
        self.steps += 1
        return self.inner.step()

    def abort_step(self) -> StepAbort:
        self.threads.add(threading.get_ident())
        return self.inner.abort_step()

    def statistics(self) -> EngineStats:
        self.threads.add(threading.get_ident())
        return self.inner.statistics()


def _loader(
    folder: Path, threads: set[int], engines: list[RecordingEngine]
) -> Callable[..., Loaded]:
    def load(progress: Callable[[float], None]) -> Loaded:
        threads.add(threading.get_ident())
        loaded = load_model(folder)
        engine = RecordingEngine(ModelEngine(loaded, prefill_chunk=8), threads)
        engines.append(engine)
        info = fake_info(context_length=engine.context_length)
        return Loaded(engine=engine, tokenizer=loaded.tokenizer, info=info)

    return load


def _request(prompt: tuple[int, ...], num_predict: int, seed: int = 7) -> GenerateRequest:
    sampling = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=seed)
    return GenerateRequest(
        tokens=prompt, options=GenerationOptions(sampling=sampling, num_predict=num_predict)
    )


async def _tokens(runner: Runner, request: GenerateRequest) -> list[int]:
    with await runner.submit(request) as generation:
        return [t for chunk in await read_to_end(generation) for t in chunk.tokens]


async def _until_freed(runner: Runner) -> None:
    with trio.fail_after(30):  # hang guard: a sequence or its cache is never released
        while (stats := runner.statistics()).active_sequences or (
            stats.cache_bytes > stats.prefix_cache_bytes
        ):
            await trio.sleep(0.001)


async def test_a_neighbour_leaving_mid_prefill_does_not_change_a_seeded_generation(
    folder: Path,
) -> None:
    threads: set[int] = set()
    engines: list[RecordingEngine] = []
    async with open_runner(load=_loader(folder, threads, engines), parallel=2) as runner:
        await runner.wait_ready()
        alone = await _tokens(runner, _request(PROMPT, 30))
        leave = trio.Event()

        async def neighbour() -> None:
            with await runner.submit(_request(NEIGHBOUR_PROMPT, 40, seed=3)):
                await leave.wait()

        with await runner.submit(_request(PROMPT, 30)) as mine:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(neighbour)
                # Our first token comes while the neighbour's 200-token prompt is still being
                # read 8 tokens a step: it leaves half prefilled, and we read on.
                got = list((await receive_chunk(mine)).tokens)
                leave.set()
                got.extend([t for chunk in await read_to_end(mine) for t in chunk.tokens])
        await _until_freed(runner)
    engine = engines[0]
    # Finished sequences are removed too; exactly one left mid-prefill, while we generated.
    left = [(active) for _, prefilling, active in engine.removals if prefilling]
    assert left == [2]
    assert got == alone
    assert engine.largest_batch == 2  # they really shared steps


async def test_load_and_every_engine_call_run_on_one_thread(folder: Path) -> None:
    threads: set[int] = set()
    engines: list[RecordingEngine] = []
    async with (
        open_runner(load=_loader(folder, threads, engines), parallel=3) as runner,
        trio.open_nursery() as nursery,
    ):
        await runner.wait_ready()
        for i in range(3):
            nursery.start_soon(_tokens, runner, _request(PROMPT[i:], 6, seed=i))
    assert len(threads) == 1
    assert threading.get_ident() not in threads


async def test_leaving_returns_the_cache_memory_within_one_step(folder: Path) -> None:
    threads: set[int] = set()
    engines: list[RecordingEngine] = []
    async with open_runner(load=_loader(folder, threads, engines)) as runner:
        await runner.wait_ready()
        with await runner.submit(_request(PROMPT, 100)) as generation:
            await receive_chunk(generation)
            assert runner.statistics().cache_bytes > 0
        steps_at_exit = engines[0].steps
        await _until_freed(runner)
        assert engines[0].steps <= steps_at_exit + 1
        assert engines[0].removed  # dropped by the scheduler, not run to its end


async def test_a_reader_that_lags_pauses_its_sequence_without_changing_its_tokens(
    folder: Path,
) -> None:
    threads: set[int] = set()
    engines: list[RecordingEngine] = []
    async with open_runner(load=_loader(folder, threads, engines), reader_pause_tokens=4) as runner:
        await runner.wait_ready()
        alone = await _tokens(runner, _request(PROMPT, 120))
        with await runner.submit(_request(PROMPT, 120)) as lagging:
            got = list((await receive_chunk(lagging)).tokens)
            # Not read on, it pauses long before its 120 tokens (a job runs at most 32 steps
            # past the bound): the pipelined engine stops feeding it with a token in flight...
            with trio.fail_after(30):  # hang guard
                while runner.statistics().paused_sequences == 0:
                    await trio.sleep(0.001)
            # ...and resumes from that token once its reader is back.
            got.extend(t for chunk in await read_to_end(lagging) for t in chunk.tokens)
    assert got == alone
    assert len(got) == 120


async def test_run_command_loads_a_model_folder(folder: Path) -> None:
    args = build_parser().parse_args(
        ["run", str(folder), "--temperature", "0", "--num-predict", "5", "Hello"]
    )
    out, err = io.StringIO(), io.StringIO()
    code = await run_command.run(args, run_command.build_request(args), out=out, err=err)
    assert code == 0
    assert "ready" in err.getvalue()
