"""Our architectures against mlx-lm's on the same random weights (float32, <= 1e-4)."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from runtime.engine.kvcache import SequenceCache
from runtime.formats.safetensors import TensorSet
from runtime.models.common import Span, SpanLayout
from runtime.models.loader import build_model
from runtime.testing.models import random_weights, tiny_config

ARCHS = ["llama", "qwen2", "qwen3"]
TOL = 1e-4


def _pair(model_type: str, **overrides: Any) -> tuple[Any, Any]:
    config = tiny_config(model_type, **overrides)
    weights = random_weights(config, seed=1)
    ours, _ = build_model(
        config, TensorSet(tensors=dict(weights), origins={}, quant={}), execution="dense"
    )
    ref_module = importlib.import_module(f"mlx_lm.models.{model_type}")
    ref = ref_module.Model(ref_module.ModelArgs.from_dict(config))
    ref.load_weights(list(weights.items()))
    mx.eval(ref.parameters())
    return ours, ref


def _diff(a: mx.array, b: mx.array) -> float:
    return float(np.max(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))))


def _tokens(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 512, size=(1, n)), dtype=mx.int32)


@pytest.mark.parametrize("model_type", ARCHS)
def test_logits_match_mlx_lm_without_cache(model_type: str) -> None:
    ours, ref = _pair(model_type)
    x = _tokens(13)
    assert _diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("model_type", ARCHS)
def test_logits_match_mlx_lm_with_cache(model_type: str) -> None:
    ours, ref = _pair(model_type)
    x = _tokens(12, seed=3)
    cache = ours.make_cache()
    ref_cache = make_prompt_cache(ref)
    assert _diff(ours(x[:, :7], cache), ref(x[:, :7], cache=ref_cache)) <= TOL
    for i in range(7, 12):  # decode one token at a time against the cache
        assert _diff(ours(x[:, i : i + 1], cache), ref(x[:, i : i + 1], cache=ref_cache)) <= TOL
    assert cache.offset == 12


def test_llama3_rope_scaling_matches_mlx_lm() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    ours, ref = _pair("llama", rope_scaling=scaling, tie_word_embeddings=False)
    x = _tokens(20)
    assert _diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("model_type", ARCHS)
def test_packed_spans_equal_separate_runs(model_type: str) -> None:
    """Two sequences in one packed step (a prefill chunk + a decode token) match solo runs."""
    ours, _ = _pair(model_type)
    a, b = _tokens(9, seed=4), _tokens(5, seed=5)
    solo_a, solo_b = ours.make_cache(), ours.make_cache()
    ours(a[:, :8], solo_a)
    want_a = ours(a[:, 8:9], solo_a)[0, -1]
    want_b = ours(b, solo_b)[0, -1]

    cache_a, cache_b = ours.make_cache(), ours.make_cache()
    ours(a[:, :8], cache_a)
    packed = mx.concatenate([a[:, 8:9], b], axis=1)
    spans = [Span(0, 1, cache_a), Span(1, 5, cache_b)]
    hidden = ours.hidden(packed, SpanLayout(spans))
    logits = ours.unembed(hidden)
    assert _diff(logits[0, 0], want_a) <= TOL
    assert _diff(logits[0, 5], want_b) <= TOL
    assert (cache_a.offset, cache_b.offset) == (9, 5)


def test_cache_truncate_then_recompute_matches() -> None:
    ours, _ = _pair("llama")
    x = _tokens(10, seed=7)
    cache: SequenceCache = ours.make_cache()
    ours(x, cache)
    want = ours(x[:, 6:7], _prefilled(ours, x[:, :6]))[0, -1]
    cache.truncate(6)
    assert cache.offset == 6
    got = ours(x[:, 6:7], cache)[0, -1]
    assert _diff(got, want) <= TOL


def _prefilled(model: Any, x: mx.array) -> SequenceCache:
    cache: SequenceCache = model.make_cache()
    model(x, cache)
    return cache
