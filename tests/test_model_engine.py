"""ModelEngine: batched steps on a tiny real model."""

from __future__ import annotations

import gc
from typing import Any

import attrs
import mlx.core as mx
import numpy as np
import pytest

from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, PrefixReuse, SequenceRequest, TokenEvent
from runtime.errors import OptionsError, PromptError
from runtime.models.loader import LoadedModel, load_model
from runtime.testing.models import make_tiny_folder

GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
SEEDED = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=7)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama")
    return load_model(folder)


def _request(seq_id: int, prompt: list[int], **kw: Any) -> SequenceRequest:
    return SequenceRequest(
        seq_id=seq_id,
        prompt=tuple(prompt),
        sampling=kw.pop("sampling", GREEDY),
        max_tokens=kw.pop("max_tokens", 8),
        **kw,
    )


def _run(engine: ModelEngine) -> dict[int, list[TokenEvent]]:
    """Step until idle, removing finished sequences as the scheduler does."""
    out: dict[int, list[TokenEvent]] = {}
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.seq_id, []).append(ev)
            if ev.finish is not None:
                engine.remove(ev.seq_id)
    return out


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def _reference_greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    model = loaded.model
    cache = model.make_cache()
    logits = model(mx.array(prompt)[None], cache)
    out = []
    for _ in range(n):
        tok = int(np.array(mx.argmax(logits[0, -1])))
        out.append(tok)
        if tok in loaded.tokenizer.eos_ids:
            break
        logits = model(mx.array([[tok]]), cache)
    return out


PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [12, 300, 8], list(range(20, 61))]


def test_single_sequence_matches_plain_greedy_loop(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(1, PROMPTS[0], max_tokens=12))
    got = _tokens(_run(engine)[1])
    assert got == _reference_greedy(loaded, PROMPTS[0], 12)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED])
def test_batched_sequences_equal_solo_runs(loaded: LoadedModel, sampling: SamplingOptions) -> None:
    solo = []
    for i, p in enumerate(PROMPTS):
        engine = ModelEngine(loaded)
        engine.add(_request(i, p, sampling=sampling, max_tokens=10))
        solo.append(_tokens(_run(engine)[i]))
    engine = ModelEngine(loaded, prefill_chunk=16)
    engine.add(_request(0, PROMPTS[0], sampling=sampling, max_tokens=10))
    out: dict[int, list[TokenEvent]] = {}
    for step in range(100):
        if step == 2:  # late joiners share steps with a decoding sequence
            engine.add(_request(1, PROMPTS[1], sampling=sampling, max_tokens=10))
            engine.add(_request(2, PROMPTS[2], sampling=sampling, max_tokens=10))
        if not engine.has_work():
            break
        for ev in engine.step():
            out.setdefault(ev.seq_id, []).append(ev)
            if ev.finish is not None:
                engine.remove(ev.seq_id)
    assert [_tokens(out[i]) for i in range(3)] == solo


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED])
def test_a_paused_row_computes_nothing_and_resumes_where_it_stopped(
    loaded: LoadedModel, sampling: SamplingOptions
) -> None:
    solo = []
    for i in (0, 1):
        engine = ModelEngine(loaded)
        engine.add(_request(i, PROMPTS[i], sampling=sampling, max_tokens=12))
        solo.append(_tokens(_run(engine)[i]))
    assert min(len(t) for t in solo) == 12  # no early EOS: every phase below has tokens
    engine = ModelEngine(loaded)
    out: dict[int, list[TokenEvent]] = {0: [], 1: []}

    def step() -> None:
        for ev in engine.step():
            out[ev.seq_id].append(ev)
            if ev.finish is not None:
                engine.remove(ev.seq_id)

    for i in (0, 1):
        engine.add(_request(i, PROMPTS[i], sampling=sampling, max_tokens=12))
    while len(_tokens(out[0])) < 3:
        step()
    engine.set_paused(0, True)
    step()  # a token already in flight for it is still reported
    held, others = len(_tokens(out[0])), len(_tokens(out[1]))
    for _ in range(3):
        step()
    assert len(_tokens(out[0])) == held  # paused: nothing computed
    assert len(_tokens(out[1])) == others + 3  # the other row stepped on alone
    engine.set_paused(0, False)
    while engine.has_work():
        step()
    assert [_tokens(out[i]) for i in (0, 1)] == solo


def test_prefill_is_chunked_and_budgeted(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded, prefill_chunk=16)
    engine.add(_request(0, list(range(40)), max_tokens=1))
    assert engine.step() == []  # pipelined: a step reports the forward before it
    assert engine.statistics().prefilling_sequences == 1
    first = engine.step()
    assert first == [TokenEvent(seq_id=0, token=None, prefilled=16)]
    second = engine.step()
    assert second[0].prefilled == 16
    assert second[0].token is None
    third = engine.step()
    assert third[0].prefilled == 8
    assert third[0].token is not None
    assert third[0].finish is FinishReason.LENGTH
    assert not engine.has_work()


def test_max_tokens_and_removal_free_the_cache(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(0, PROMPTS[0], max_tokens=3))
    engine.add(_request(1, PROMPTS[1], max_tokens=50))
    engine.step()
    assert engine.statistics().cache_bytes > 0
    engine.remove(1)
    events = _run(engine)
    assert len(_tokens(events[0])) <= 3
    assert events[0][-1].finish in (FinishReason.LENGTH, FinishReason.STOP)
    assert engine.statistics().active_sequences == 0
    assert engine.statistics().cache_bytes == 0


def test_eos_finishes_with_stop(loaded: LoadedModel) -> None:
    want = _reference_greedy(loaded, PROMPTS[2], 40)
    engine = ModelEngine(loaded)
    # Make the first greedy token an end-of-sequence token for this engine.
    object.__setattr__(engine, "_eos", frozenset({want[0]}))
    engine.add(_request(0, PROMPTS[2], max_tokens=40))
    events = _run(engine)[0]
    assert events[-1].token == want[0]
    assert events[-1].finish is FinishReason.STOP


def test_prompt_errors(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded, context_length=32)
    with pytest.raises(PromptError, match="empty"):
        engine.add(_request(0, []))
    with pytest.raises(PromptError, match="context length"):
        engine.add(_request(0, list(range(32))))
    with pytest.raises(PromptError, match="vocabulary"):
        engine.add(_request(0, [10**6]))


def test_context_full_ends_with_length(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded, context_length=12)
    engine.add(_request(0, list(range(8)), max_tokens=100))
    events = _run(engine)[0]
    assert events[-1].finish is FinishReason.LENGTH
    assert len(_tokens(events)) == 12 - 8


def test_logprobs_are_reported(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(0, PROMPTS[0], max_tokens=2, logprobs=True, top_logprobs=3))
    events = [e for e in _run(engine)[0] if e.token is not None]
    for ev in events:
        assert ev.logprob is not None
        assert ev.logprob.token == ev.token
        assert len(ev.logprob.top) == 3
        assert ev.logprob.top[0][1] >= ev.logprob.top[1][1] >= ev.logprob.top[2][1]
        assert ev.logprob.logprob <= 0


def test_a_prefix_hit_gives_the_tokens_of_a_cold_run(loaded: LoadedModel) -> None:
    first, follow_up = PROMPTS[2], [*PROMPTS[2], 7, 8, 9, 10]
    cold = ModelEngine(loaded)
    cold.add(_request(0, follow_up, max_tokens=10))
    want = _tokens(_run(cold)[0])

    engine = ModelEngine(loaded, prefill_chunk=16)
    engine.add(_request(1, first, max_tokens=3))
    while engine.has_work():
        engine.step()
    kept = engine.remove(1, save_as=42)
    assert kept >= len(first)
    assert engine.statistics().prefix_bytes == kept * engine.kv_bytes_per_token
    engine.add(_request(2, follow_up, max_tokens=10, reuse=PrefixReuse(entry_id=42, length=40)))
    assert engine._by_id[2].length == 40  # only the rest of the prompt is computed
    assert _tokens(_run(engine)[2]) == want
    engine.drop_prefix(42)
    assert engine.statistics().cache_bytes == 0


def test_a_cancelled_prefill_never_becomes_an_entry(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded, prefill_chunk=8)
    engine.add(_request(0, list(range(40)), max_tokens=4))
    engine.step()
    engine.step()
    assert engine._by_id[0].pending  # still reading its prompt
    assert engine.remove(0, save_as=1) == 0
    assert engine.statistics().prefix_bytes == 0


def test_step_cost_does_not_loop_over_sequences_in_attention(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All decode rows share one attention call per layer (one call per layer per step)."""
    import runtime.engine.batch_cache as batch_cache

    calls = 0
    real = batch_cache.fused.attention

    def counting(*args: Any, **kw: Any) -> mx.array:
        nonlocal calls
        calls += 1
        return real(*args, **kw)

    engine = ModelEngine(loaded)
    for i in range(6):
        engine.add(_request(i, [1 + i, 2, 3], max_tokens=20))
    for _ in range(3):  # prompts read, everyone decoding
        engine.step()
    monkeypatch.setattr(batch_cache.fused, "attention", counting)
    engine.step()
    assert calls == engine.model.num_layers


def test_rows_in_step_attend_without_a_mask_and_equal_solo_runs(loaded: LoadedModel) -> None:
    prompts = [[5, 17, 99, 3], [12, 300, 8, 41], [7, 7, 7, 7]]  # equal lengths: no mask
    solo = []
    for i, p in enumerate(prompts):
        engine = ModelEngine(loaded)
        engine.add(_request(i, p, max_tokens=8))
        solo.append(_tokens(_run(engine)[i]))
    engine = ModelEngine(loaded)
    for i, p in enumerate(prompts):
        engine.add(_request(i, p, max_tokens=8))
    together = _run(engine)
    assert [_tokens(together[i]) for i in range(3)] == solo


def test_warm_up_runs_every_kind_of_step_and_leaves_the_engine_empty(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.engine import batch_cache
    from runtime.engine.lifecycle import warm_up

    decode_shapes: set[tuple[bool, bool]] = set()  # (4+ rows, span past 128 positions)
    build = batch_cache.BatchLayout.build

    def spy(*args: Any, **kwargs: Any) -> batch_cache.BatchLayout:
        layout = build(*args, **kwargs)
        if layout.rows:
            decode_shapes.add((layout.rows >= 4, layout.span > 128))
        return layout

    monkeypatch.setattr(batch_cache.BatchLayout, "build", spy)
    engine = ModelEngine(loaded, prefill_chunk=64)
    seen: list[float] = []
    warm_up(engine, seen.append)
    # Decode batches of 4+ rows ran both short and past 128 positions.
    assert {(True, False), (True, True)} <= decode_shapes
    assert seen[-1] == 1.0
    assert seen == sorted(seen)
    stats = engine.statistics()
    assert (stats.active_sequences, stats.cache_bytes) == (0, 0)
    # and the engine still serves afterwards
    engine.add(_request(0, PROMPTS[0], max_tokens=4))
    assert _tokens(_run(engine)[0]) == _reference_greedy(loaded, PROMPTS[0], 4)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED])
def test_logit_bias_forces_and_bans_tokens_batched_as_solo(
    loaded: LoadedModel, sampling: SamplingOptions
) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(0, PROMPTS[0], sampling=sampling, max_tokens=6))
    plain = _tokens(_run(engine)[0])
    banned = tuple((t, -100.0) for t in set(plain))
    forced = ((42, 100.0),)
    solo = []
    for i, bias in enumerate((banned, forced)):
        engine = ModelEngine(loaded)
        engine.add(_request(i, PROMPTS[i], sampling=sampling, max_tokens=6, logit_bias=bias))
        solo.append(_tokens(_run(engine)[i]))
    assert not set(solo[0]) & set(plain)
    assert solo[1] == [42] * 6
    # Batched beside an unbiased row, each row gets its own bias only.
    engine = ModelEngine(loaded)
    engine.add(_request(0, PROMPTS[0], sampling=sampling, max_tokens=6, logit_bias=banned))
    engine.add(_request(1, PROMPTS[1], sampling=sampling, max_tokens=6, logit_bias=forced))
    engine.add(_request(2, PROMPTS[0], sampling=sampling, max_tokens=6))
    out = _run(engine)
    assert [_tokens(out[i]) for i in range(3)] == [*solo, plain]


def test_logprobs_are_those_of_the_biased_logits(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(0, PROMPTS[0], max_tokens=2, logprobs=True, logit_bias=((42, 100.0),)))
    events = [e for e in _run(engine)[0] if e.token is not None]
    assert [e.token for e in events] == [42, 42]
    assert all(e.logprob is not None and e.logprob.logprob > -1e-3 for e in events)


def test_logit_bias_ids_outside_the_vocabulary_are_refused(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    with pytest.raises(OptionsError, match="logit_bias"):
        engine.add(_request(0, PROMPTS[0], logit_bias=((10**6, 1.0),)))
    assert not engine.has_work()


def _prefilled(events: list[TokenEvent]) -> int:
    return sum(e.prefilled for e in events)


@pytest.mark.parametrize("late", [False, True])
def test_a_sibling_copies_the_computed_prompt_and_computes_only_its_last_token(
    loaded: LoadedModel, late: bool
) -> None:
    prompt = PROMPTS[2]  # 41 tokens: three chunks of 16
    seeded = [attrs.evolve(SEEDED, seed=s) for s in (1, 2)]
    solo = []
    for i, sampling in enumerate(seeded):
        engine = ModelEngine(loaded, prefill_chunk=16)
        engine.add(_request(i, prompt, sampling=sampling, max_tokens=6))
        solo.append(_tokens(_run(engine)[i]))
    engine = ModelEngine(loaded, prefill_chunk=16)
    engine.add(_request(0, prompt, sampling=seeded[0], max_tokens=6))
    out: dict[int, list[TokenEvent]] = {}
    if late:  # the sibling joins while the first is half way through its prompt
        for ev in engine.step():
            out.setdefault(ev.seq_id, []).append(ev)
    engine.add(_request(1, prompt, sampling=seeded[1], max_tokens=6, share_prompt_of=0))
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.seq_id, []).append(ev)
            if ev.finish is not None:
                engine.remove(ev.seq_id)
    assert [_tokens(out[i]) for i in range(2)] == solo
    assert _prefilled(out[0]) == len(prompt)
    assert _prefilled(out[1]) == 1


def test_a_sibling_whose_first_is_gone_computes_its_own_prompt(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded, prefill_chunk=16)
    engine.add(_request(0, PROMPTS[2], max_tokens=4))
    engine.add(_request(1, PROMPTS[2], max_tokens=4, share_prompt_of=0))
    engine.step()
    engine.remove(0)  # cut before its prompt was computed
    engine.add(_request(2, PROMPTS[0], max_tokens=4))  # may take its row
    events = _run(engine)
    assert _prefilled(events[1]) == len(PROMPTS[2])
    assert _tokens(events[1]) == _reference_greedy(loaded, PROMPTS[2], 4)


def test_an_engine_with_fused_projections_gives_the_same_tokens(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fusion is the default on CUDA only; force it here (it rewrites the model, so a copy).
    fused = load_model(make_tiny_folder(tmp_path / "m", "llama"))
    plain = load_model(tmp_path / "m")
    monkeypatch.setenv("MLXRUNNER_FUSED_PROJECTIONS", "1")
    engine = ModelEngine(fused)
    assert "qkv_proj" in fused.model.model.layers[0].self_attn
    for i, prompt in enumerate(PROMPTS):
        engine.add(_request(i, prompt, max_tokens=10))
    got = {i: _tokens(events) for i, events in _run(engine).items()}
    monkeypatch.setenv("MLXRUNNER_FUSED_PROJECTIONS", "0")
    reference = ModelEngine(plain)
    assert "q_proj" in plain.model.model.layers[0].self_attn
    for i, prompt in enumerate(PROMPTS):
        reference.add(_request(i, prompt, max_tokens=10))
    assert got == {i: _tokens(events) for i, events in _run(reference).items()}


def test_a_saved_prefix_does_not_keep_the_batch_buffer_alive(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    gc.collect()
    base = mx.get_active_memory()
    for i in range(4):
        engine.add(_request(i, list(range(5, 15)), max_tokens=4))
    peak = 0
    while engine.has_work():
        peak = max(peak, engine._cache.nbytes)
        for ev in engine.step():
            if ev.finish is not None:
                engine.remove(ev.seq_id, save_as=100 + ev.seq_id)
    assert engine._cache.nbytes == 0  # the batch emptied and gave its buffers back
    gc.collect()
    held = mx.get_active_memory() - base
    # The entries' own copies (a few KB), not the 4-row buffers they were copied from.
    assert held < peak // 4


def test_warm_up_reaches_the_split_kernel_where_there_is_one_and_embeds(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.engine import batch_cache, decode_attention, lifecycle

    long_context = load_model(
        make_tiny_folder(tmp_path / "m", "llama", max_position_embeddings=1024)
    )
    split_rows: list[int] = []
    build = batch_cache.BatchLayout.build

    def spy(*args: Any, **kwargs: Any) -> batch_cache.BatchLayout:
        layout = build(*args, **kwargs)
        heads = long_context.model.args.kv_heads
        if layout.rows and decode_attention.splits_for(layout.rows, heads, layout.span) > 1:
            split_rows.append(layout.rows)
        return layout

    monkeypatch.setattr(batch_cache.BatchLayout, "build", spy)
    engine = ModelEngine(long_context, prefill_chunk=4096)
    embedded: list[int] = []
    real_embed = engine.embed

    def embed(inputs: Any, **kw: Any) -> list[list[float]]:
        embedded.append(len(inputs))
        return real_embed(inputs, **kw)

    monkeypatch.setattr(engine, "embed", embed)
    monkeypatch.setattr(lifecycle, "kernel_attention", lambda: True)  # as on CUDA
    lifecycle.warm_up(engine)
    assert split_rows  # a decode step long enough for the split kernel and its merge
    assert embedded == [1]
