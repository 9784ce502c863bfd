"""Embeddings on the tiny model: the pooled vector equals a direct computation, a packed batch
of different lengths equals one by one, normalisation, truncation, and chunk planning."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from runtime.engine.embedding import embed_tokens, plan_chunks
from runtime.engine.model_engine import ModelEngine
from runtime.errors import PromptError
from runtime.formats.model_files import POOLING_KEY, folder_files
from runtime.models.common import single_span
from runtime.models.loader import LoadedModel, load_model
from runtime.testing.models import make_tiny_folder


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama"))


def _direct(loaded: LoadedModel, tokens: list[int]) -> list[float]:
    model = loaded.model
    inputs = mx.array(tokens, dtype=mx.int32)[None]
    hidden = model.hidden(inputs, single_span(inputs, model.make_cache()))[0]
    out: list[float] = mx.mean(hidden.astype(mx.float32), axis=0).tolist()  # type: ignore[assignment]
    return out


def test_pooled_vector_equals_a_direct_mean_of_the_hidden_states(loaded: LoadedModel) -> None:
    tokens = [5, 17, 42, 8]
    (vector,) = embed_tokens(loaded.model, [tokens], vocab_size=512, normalize=False)
    assert vector == pytest.approx(_direct(loaded, tokens), abs=1e-5)
    assert len(vector) == loaded.model.args.hidden_size


def test_a_batch_of_different_lengths_equals_one_by_one(loaded: LoadedModel) -> None:
    inputs = [[3], [9, 10, 11, 12, 13, 14, 15], [100, 7]]
    batch = embed_tokens(loaded.model, inputs, vocab_size=512, normalize=False)
    for tokens, vector in zip(inputs, batch, strict=True):
        assert vector == pytest.approx(_direct(loaded, tokens), abs=1e-5)


def test_normalised_vectors_have_unit_norm_and_keep_direction(loaded: LoadedModel) -> None:
    tokens = [1, 2, 3]
    raw = _direct(loaded, tokens)
    (unit,) = embed_tokens(loaded.model, [tokens], vocab_size=512, normalize=True)
    norm = math.sqrt(sum(x * x for x in raw))
    assert math.sqrt(sum(x * x for x in unit)) == pytest.approx(1.0, abs=1e-5)
    assert unit == pytest.approx([x / norm for x in raw], abs=1e-5)


def test_dimensions_keeps_a_prefix_then_renormalises(loaded: LoadedModel) -> None:
    tokens = [4, 4, 4]
    raw = _direct(loaded, tokens)[:8]
    (short,) = embed_tokens(loaded.model, [tokens], vocab_size=512, normalize=True, dimensions=8)
    norm = math.sqrt(sum(x * x for x in raw))
    assert short == pytest.approx([x / norm for x in raw], abs=1e-5)


def test_bad_inputs_are_refused(loaded: LoadedModel) -> None:
    with pytest.raises(PromptError, match="outside the vocabulary"):
        embed_tokens(loaded.model, [[1, 999]], vocab_size=512, normalize=True)
    with pytest.raises(PromptError, match="empty"):
        embed_tokens(loaded.model, [[]], vocab_size=512, normalize=True)


def test_the_model_engine_embeds_without_touching_its_cache(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    (vector,) = engine.embed([(5, 6, 7)], normalize=False)
    assert vector == pytest.approx(_direct(loaded, [5, 6, 7]), abs=1e-5)
    assert engine.statistics().cache_bytes == 0


def test_chunks_hold_at_most_the_token_budget() -> None:
    assert plan_chunks([3, 3, 3, 3], 6) == [range(0, 2), range(2, 4)]
    assert plan_chunks([10, 1, 1], 4) == [range(0, 1), range(1, 3)]  # a long one alone
    assert plan_chunks([1, 1, 1], 100) == [range(0, 3)]
    assert plan_chunks([], 4) == []


@pytest.mark.parametrize(
    ("pooling", "pick"),
    [("cls", lambda h: h[0]), ("last", lambda h: h[-1]), ("max", lambda h: mx.max(h, axis=0))],
)
def test_other_poolings_take_what_they_name(loaded: LoadedModel, pooling: str, pick: Any) -> None:
    tokens = [5, 17, 42, 8]
    model = loaded.model
    inputs = mx.array(tokens, dtype=mx.int32)[None]
    hidden = model.hidden(inputs, single_span(inputs, model.make_cache()))[0].astype(mx.float32)
    (vector,) = embed_tokens(
        model, [tokens, [1, 2]], vocab_size=512, normalize=False, pooling=pooling
    )[:1]
    assert vector == pytest.approx(pick(hidden).tolist(), abs=1e-5)
    assert vector != pytest.approx(_direct(loaded, tokens), abs=1e-5)


def _with_pooling_module(folder: Path, flags: dict[str, bool], path: str = "1_Pooling") -> None:
    (folder / path).mkdir()
    (folder / path / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, **flags})
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last"),
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),  # concat
    ],
)
def test_a_sentence_transformers_folder_names_its_pooling(
    tmp_path: Path, flags: dict[str, bool], expected: str | None
) -> None:
    folder = make_tiny_folder(tmp_path / "m", "llama")
    _with_pooling_module(folder, flags)
    assert folder_files(folder).config.get(POOLING_KEY) == expected


def test_modules_json_says_where_the_pooling_module_is(tmp_path: Path) -> None:
    folder = make_tiny_folder(tmp_path / "m", "llama")
    _with_pooling_module(folder, {"pooling_mode_cls_token": True}, path="2_Pool")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert folder_files(folder).config[POOLING_KEY] == "cls"


def test_the_engine_pools_as_the_model_folder_says(tmp_path: Path) -> None:
    folder = make_tiny_folder(tmp_path / "m", "llama")
    _with_pooling_module(folder, {"pooling_mode_lasttoken": True})
    loaded = load_model(folder)
    tokens = [5, 17, 42, 8]
    (vector,) = ModelEngine(loaded).embed([tokens], normalize=False)
    (last,) = embed_tokens(loaded.model, [tokens], vocab_size=512, normalize=False, pooling="last")
    assert vector == pytest.approx(last, abs=1e-6)
