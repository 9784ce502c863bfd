"""``ModelEngine.abort_step`` on a tiny real model: a failed step costs its own sequences only,
and everything the engine keeps afterwards computes exactly what a fault-free engine does."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, PrefixReuse, SequenceRequest, TokenEvent
from runtime.models.loader import LoadedModel, load_model
from runtime.testing.faults import FaultyModel
from runtime.testing.models import make_tiny_folder

GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
PENALIZED = SamplingOptions(temperature=0.0, repeat_penalty=1.3)  # keeps a token history

ENTRY_PROMPT = [5, 17, 99, 3, 250, 41, 7]
FINISHED_PROMPT = [12, 300, 8, 9]  # A: one token, then it waits for its removal
DECODING_PROMPT = [60, 61, 62]  # B: decodes through the fault
READING_PROMPT = list(range(100, 140))  # D: reads its prompt 8 tokens a step
WAITING_PROMPT = list(range(150, 180))  # C: waits for prefill budget behind D


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama"))


def _request(seq_id: int, prompt: list[int], max_tokens: int, **kw: Any) -> SequenceRequest:
    sampling = kw.pop("sampling", GREEDY)
    return SequenceRequest(
        seq_id=seq_id, prompt=tuple(prompt), sampling=sampling, max_tokens=max_tokens, **kw
    )


def _tokens(events: list[TokenEvent], seq_id: int) -> list[int]:
    return [e.token for e in events if e.seq_id == seq_id and e.token is not None]


def _run_until_done(engine: ModelEngine, seq_ids: set[int]) -> list[TokenEvent]:
    """Step until every one of ``seq_ids`` finished (they keep their rows)."""
    events: list[TokenEvent] = []
    waiting = set(seq_ids)
    for _ in range(200):
        if not waiting:
            return events
        for event in engine.step():
            events.append(event)
            if event.finish is not None:
                waiting.discard(event.seq_id)
    raise AssertionError(f"{waiting} never finished")


def _alone(loaded: LoadedModel, prompt: list[int], max_tokens: int, **kw: Any) -> list[int]:
    """The tokens a fault-free engine gives ``prompt`` by itself."""
    engine = ModelEngine(loaded, prefill_chunk=8)
    engine.add(_request(1, prompt, max_tokens, **kw))
    return _tokens(_run_until_done(engine, {1}), 1)


def _engine_with_entry(loaded: LoadedModel, model: FaultyModel) -> ModelEngine:
    """An engine holding prefix entry 100 (``ENTRY_PROMPT``'s positions), and nothing else."""
    engine = ModelEngine(attrs.evolve(loaded, model=model), prefill_chunk=8)
    engine.add(_request(10, ENTRY_PROMPT, 2))
    _run_until_done(engine, {10})
    assert engine.remove(10, save_as=100) > len(ENTRY_PROMPT)
    return engine


def _start_the_scene(engine: ModelEngine) -> list[TokenEvent]:
    """A finishes at once and waits for its removal, B decodes, D reads a long prompt that
    takes the whole prefill budget while C waits behind it (chunks go in id order). Steps
    until A's end has been reported; A is in no forward after that."""
    engine.add(_request(1, FINISHED_PROMPT, 1))
    engine.add(_request(2, DECODING_PROMPT, 30, sampling=PENALIZED))
    engine.add(_request(3, READING_PROMPT, 4))
    engine.add(_request(4, WAITING_PROMPT, 4))
    events = engine.step() + engine.step()
    assert any(e.seq_id == 1 and e.finish is FinishReason.LENGTH for e in events)
    return events


def _check_entry(
    engine: ModelEngine, loaded: LoadedModel, seq_id: int, entry: int, prefix: list[int]
) -> None:
    """A prompt starting from ``entry`` (``prefix``'s positions) gives what it gives alone."""
    prompt = [*prefix, 33, 44]
    reuse = PrefixReuse(entry_id=entry, length=len(prefix))
    engine.add(_request(seq_id, prompt, 6, reuse=reuse))
    assert engine.statistics().prefilling_sequences == 1
    assert _tokens(_run_until_done(engine, {seq_id}), seq_id) == _alone(loaded, prompt, 6)
    engine.remove(seq_id)


@pytest.mark.parametrize("method", ["hidden", "unembed"])
def test_a_fault_building_a_forward_fails_only_the_rows_it_covers(
    loaded: LoadedModel, method: str
) -> None:
    model = FaultyModel(loaded.model, method=method)
    engine = _engine_with_entry(loaded, model)
    _start_the_scene(engine)
    # Forward 4 fails while it is built (``unembed``: after the rows advanced their state).
    model.fail_at = model.calls + 2
    assert engine.step() != []
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    abort = engine.abort_step()
    # The step read forward 3 back and started forward 4: B and D were in them.
    assert abort.failed == (2, 3)
    assert abort.lost_entries == ()
    stats = engine.statistics()
    assert (stats.active_sequences, stats.prefilling_sequences) == (2, 1)
    # A's positions are intact: they become an entry that computes what A's prompt does.
    assert engine.remove(1, save_as=101) == len(FINISHED_PROMPT)
    # C reads its prompt from the start and generates what it does alone.
    events = _run_until_done(engine, {4})
    assert _tokens(events, 4) == _alone(loaded, WAITING_PROMPT, 4)
    engine.remove(4)
    _check_entry(engine, loaded, 20, 100, ENTRY_PROMPT)
    _check_entry(engine, loaded, 21, 101, FINISHED_PROMPT)
    # Sequences after the fault generate what they do on an engine that never failed.
    engine.add(_request(22, DECODING_PROMPT, 30, sampling=PENALIZED))
    events = _run_until_done(engine, {22})
    assert _tokens(events, 22) == _alone(loaded, DECODING_PROMPT, 30, sampling=PENALIZED)
    engine.remove(22)
    stats = engine.statistics()
    assert stats.active_sequences == 0
    assert stats.cache_bytes == stats.prefix_bytes > 0  # entries 100 and 101 only


def test_a_fault_in_evaluation_drops_the_batch_and_every_entry(loaded: LoadedModel) -> None:
    model = FaultyModel(loaded.model, method="hidden", in_evaluation=True)
    engine = _engine_with_entry(loaded, model)
    _start_the_scene(engine)
    # Forward 3 computes a failure. It surfaces when MLX evaluates it (as it is handed over,
    # or when its tokens are read back); after that, arrays the evaluation reached may read
    # back as made-up values without another error (seen with MLX 0.32 on the CPU).
    model.fail_at = model.calls + 1
    with pytest.raises(RuntimeError, match="LU factorization"):  # noqa: PT012
        for _ in range(2):
            engine.step()
    abort = engine.abort_step()
    assert abort.failed == (1, 2, 3, 4)
    assert abort.lost_entries == (100,)
    stats = engine.statistics()
    assert (stats.active_sequences, stats.cache_bytes) == (0, 0)
    assert engine.remove(1, save_as=101) == 0  # gone: nothing of it is kept
    engine.add(_request(21, DECODING_PROMPT, 30, sampling=PENALIZED))
    events = _run_until_done(engine, {21})
    assert _tokens(events, 21) == _alone(loaded, DECODING_PROMPT, 30, sampling=PENALIZED)
