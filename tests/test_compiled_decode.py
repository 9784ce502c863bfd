"""Compiled decode steps (runtime/engine/compiled_decode.py): same tokens as steps built in
Python, one trace per step shape, the cache updated in place, and only where the graph
depends on nothing but its arrays."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from runtime.engine import compiled_decode, decode_attention
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import PrefixReuse, SequenceRequest
from runtime.models.common import Rope
from runtime.models.loader import LoadedModel, load_model
from runtime.testing.models import make_tiny_folder

GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
SEEDED = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=7)
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [12, 300, 8], list(range(20, 41)), [9, 9, 9, 9, 1]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_tiny_folder(
        tmp_path_factory.mktemp("tiny") / "m", "llama", max_position_embeddings=2048
    )
    return load_model(folder)


def _reference_kernel(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    offsets: mx.array,
    *,
    rope: Rope,
    scale: float,
    longest: int,
    every_row_decodes: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """The decode-attention kernel's contract in MLX ops: each row with an offset rotates its
    new query and key to that position, writes its key and value there and reads positions
    0..offset of the whole cache; a row at -1 is left alone. The kernel writes the caches on
    the device and returns them as given; here they are new arrays. Like the kernel, nothing
    here depends on ``longest``. ``every_row_decodes`` skips reading what a row at -1 keeps
    (a read of the cache would keep MLX from updating it in place)."""
    rows, positions = queries.shape[0], key_cache.shape[2]
    decoding = offsets >= 0
    at = mx.maximum(offsets, 0)
    queries, keys = rope(queries, at), rope(keys, at)
    index = mx.broadcast_to(at.reshape(rows, 1, 1, 1), keys.shape)
    written = []
    for cache, new in ((key_cache, keys), (value_cache, values)):
        if not every_row_decodes:
            kept = mx.take_along_axis(cache, index, axis=2)  # what a row at -1 keeps
            new = mx.where(decoding[:, None, None, None], new, kept)
        written.append(mx.put_along_axis(cache, index, new, axis=2))
    key_cache, value_cache = written
    visible = (mx.arange(positions)[None, :] <= offsets[:, None]).reshape(rows, 1, 1, positions)
    out = mx.fast.scaled_dot_product_attention(
        queries, key_cache[:rows], value_cache[:rows], scale=scale, mask=visible
    )
    return mx.where(decoding[:, None, None, None], out, mx.zeros_like(out)), key_cache, value_cache


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps take the kernel's path here as on CUDA, the kernel itself being CUDA's."""
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    monkeypatch.setattr(decode_attention, "decode_attention", _reference_kernel)
    # The tiny model's heads (16 features) are narrower than the CUDA kernel takes; its stand-in
    # takes any.
    monkeypatch.setattr(decode_attention, "supports", lambda queries, cache: True)


def _generate(engine: ModelEngine, prompts: list[list[int]], **kw: Any) -> dict[int, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add(
            SequenceRequest(
                seq_id=i,
                prompt=tuple(prompt),
                sampling=kw.get("sampling", GREEDY),
                max_tokens=kw.get("max_tokens", 24),
                logit_bias=tuple((eos, -1e9) for eos in engine.tokenizer.eos_ids),  # run long
            )
        )
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                out[event.seq_id].append(event.token)
            if event.finish is not None:
                engine.remove(event.seq_id)
    return out


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED])
def test_compiled_steps_give_the_tokens_of_steps_built_in_python(
    loaded: LoadedModel, sampling: SamplingOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = ModelEngine(loaded)
    got = _generate(compiled, PROMPTS, sampling=sampling)
    assert compiled._decode.traces == 1  # rows of different lengths, one step shape
    monkeypatch.setenv("MLXRUNNER_COMPILED_DECODE", "0")
    plain = ModelEngine(loaded)
    assert _generate(plain, PROMPTS, sampling=sampling) == got
    assert plain._decode.traces == 0


@pytest.mark.usefixtures("kernel")
def test_a_new_step_shape_traces_once_and_growth_steps_run_uncompiled(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = ModelEngine(loaded)
    keys: list[Any] = []
    real_key = engine._decode._key

    def spy(tokens: mx.array, layout: Any) -> Any:
        keys.append(real_key(tokens, layout))
        return keys[-1]

    monkeypatch.setattr(engine._decode, "_key", spy)
    # 4 rows cross 256 positions: the cache grows (a step built in Python), then a new shape.
    _generate(engine, [[7] * 250, [8] * 240, [9] * 230, [10] * 220], max_tokens=40)
    shapes = [key for key in keys if key is not None]
    assert None in keys  # the growing step
    # Each shape traced once: before and after the growth, and the kernel's split bucket
    # (span // 256) of the rows that decode, which moves with the longest of them.
    assert len(set(shapes)) == engine._decode.traces >= 2
    assert len(shapes) > 3 * engine._decode.traces


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("held", [False, True])
def test_compiled_steps_write_the_cache_in_place(
    loaded: LoadedModel, held: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each compiled step is evaluated on its own here, its memory peak measured: a copy of a
    layer's keys would raise it by that layer's bytes, and does when the old cache arrays are
    still held elsewhere (``held``, the check that the measure sees copies)."""
    monkeypatch.setattr(
        decode_attention,
        "decode_attention",
        functools.partial(_reference_kernel, every_row_decodes=True),
    )
    engine = ModelEngine(loaded)
    decode = engine._decode
    real = decode.hidden
    peaks: list[int] = []
    kept: list[Any] = []

    def measured(tokens: mx.array, layout: Any) -> mx.array:
        if held:
            kept[:] = [list(engine._cache.keys), list(engine._cache.values)]
        hidden = real(tokens, layout)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(hidden, *engine._cache.arrays)
        peaks.append(mx.get_peak_memory() - before)
        return hidden

    monkeypatch.setattr(decode, "hidden", measured)
    for i, prompt in enumerate([[3] * 900, [4] * 900, [5] * 900, [6] * 900]):
        engine.add(SequenceRequest(seq_id=i, prompt=tuple(prompt), sampling=GREEDY, max_tokens=40))
    for _ in range(16):  # prefill (512 tokens a step), then decode steps
        engine.step()
    assert decode.traces == 1
    layer_bytes = engine._cache.keys[0].nbytes  # type: ignore[union-attr]
    copied = [peak >= layer_bytes for peak in peaks[-4:]]
    assert copied == [held] * 4


def test_steps_without_the_kernel_or_with_windows_are_built_in_python(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = ModelEngine(loaded)  # on the CPU: MLX's attention, whose graph depends on the span
    _generate(engine, PROMPTS, max_tokens=6)
    assert engine._decode.traces == 0
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    monkeypatch.setattr(decode_attention, "decode_attention", _reference_kernel)
    monkeypatch.setattr(decode_attention, "supports", lambda queries, cache: True)
    windowed = load_model(make_tiny_folder(tmp_path / "w", "gemma3_text"))
    assert compiled_decode.windowed(windowed.model)
    assert not compiled_decode.windowed(loaded.model)
    gemma = ModelEngine(windowed)
    _generate(gemma, PROMPTS, max_tokens=6)
    assert gemma._decode.traces == 0


def test_a_model_whose_heads_the_kernel_declines_is_not_compiled_past_its_first_trace(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its steps attend through MLX with the span's mask: a replay would keep the traced span
    and drop each row's newest positions."""
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    monkeypatch.setattr(decode_attention, "decode_attention", _reference_kernel)
    monkeypatch.setenv("MLXRUNNER_COMPILED_DECODE", "0")
    want = _generate(ModelEngine(loaded), PROMPTS)
    monkeypatch.setenv("MLXRUNNER_COMPILED_DECODE", "1")
    engine = ModelEngine(loaded)
    assert _generate(engine, PROMPTS) == want
    assert engine._decode.traces == 1
    assert not engine._decode.usable


@pytest.mark.usefixtures("kernel")
def test_a_prefix_saved_after_compiled_steps_gives_the_tokens_of_a_cold_run(
    loaded: LoadedModel,
) -> None:
    """The prefix cache copies rows of a cache the compiled steps wrote, and a hit computed
    beside other running rows (compiled steps) equals a cold run."""
    first, follow_up = PROMPTS[2], [*PROMPTS[2], 7, 8, 9, 10]
    cold = ModelEngine(loaded)
    want = _generate(cold, [follow_up], max_tokens=10)[0]

    engine = ModelEngine(loaded)
    bias = tuple((eos, -1e9) for eos in engine.tokenizer.eos_ids)
    for seq_id, prompt in enumerate([first, *PROMPTS[:2], PROMPTS[3]]):
        max_tokens = 6 if seq_id == 0 else 60  # the others keep the batch at 4+ rows
        engine.add(
            SequenceRequest(
                seq_id=seq_id,
                prompt=tuple(prompt),
                sampling=GREEDY,
                max_tokens=max_tokens,
                logit_bias=bias,
            )
        )
    while 0 in engine._by_id:
        for event in engine.step():
            if event.seq_id == 0 and event.finish is not None:
                assert engine.remove(0, save_as=42) >= len(first)
    assert engine._decode.traces >= 1
    engine.add(
        SequenceRequest(
            seq_id=9,
            prompt=tuple(follow_up),
            sampling=GREEDY,
            max_tokens=10,
            logit_bias=bias,
            reuse=PrefixReuse(entry_id=42, length=len(first)),
        )
    )
    assert engine._by_id[9].length == len(first)  # only the rest of the prompt is computed
    got: list[int] = []
    while 9 in engine._by_id:
        for event in engine.step():
            if event.seq_id == 9 and event.token is not None:
                got.append(event.token)
            if event.seq_id == 9 and event.finish is not None:
                engine.remove(9)
    assert got == want
