"""Gemma 3, Phi-3 and Mistral against mlx-lm on tiny random weights, and through the engine.

The tiny configs (``runtime.testing.models``) slide over 8 positions in one of their two
layers (Gemma 3, Mistral), so prompts of 11-20 tokens cross the window in prefill and decode;
Phi-3's rotates three quarters of each head with longrope scaling.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from runtime.engine.batch_cache import BatchKVCache, BatchLayout, PrefillChunk
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import SequenceRequest, TokenEvent
from runtime.errors import ModelLoadError
from runtime.formats.safetensors import TensorSet
from runtime.models import architecture
from runtime.models.common import Span, SpanLayout
from runtime.models.description import describe
from runtime.models.loader import LoadedModel, build_model, load_model
from runtime.models.projections import fuse_projections
from runtime.testing.models import make_tiny_folder, random_weights, tiny_config

ARCHS = ["gemma3_text", "phi3", "mistral", "ministral3"]
REFERENCE = {"gemma3_text": "gemma3_text", "phi3": "phi3", "mistral": "llama"}
REFERENCE["ministral3"] = "ministral3"
TOL = 1e-4
GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)


def _ours(config: dict[str, Any], weights: dict[str, mx.array]) -> Any:
    tensors = TensorSet(tensors=dict(weights), origins={}, quant={})
    return build_model(config, tensors, execution="dense")[0]


def _reference(model_type: str, config: dict[str, Any], weights: dict[str, mx.array]) -> Any:
    module = importlib.import_module(f"mlx_lm.models.{REFERENCE[model_type]}")
    ref = module.Model(module.ModelArgs.from_dict(config))
    if hasattr(ref, "sanitize"):
        weights = ref.sanitize(dict(weights))
    ref.load_weights(list(weights.items()))
    mx.eval(ref.parameters())
    return ref


def _pair(model_type: str, **overrides: Any) -> tuple[Any, Any]:
    config = tiny_config(model_type, **overrides)
    weights = random_weights(config, seed=1)
    return _ours(config, weights), _reference(model_type, config, weights)


def _diff(a: mx.array, b: mx.array) -> float:
    return float(np.max(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))))


def _tokens(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 512, size=(1, n)), dtype=mx.int32)


@pytest.mark.parametrize("model_type", ARCHS)
def test_prompt_logits_match_mlx_lm(model_type: str) -> None:
    ours, ref = _pair(model_type)
    x = _tokens(20)
    assert _diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("model_type", ARCHS)
def test_prompt_then_decode_steps_match_mlx_lm(model_type: str) -> None:
    ours, ref = _pair(model_type)
    x = _tokens(20, seed=3)
    cache, ref_cache = ours.make_cache(), make_prompt_cache(ref)
    assert _diff(ours(x[:, :11], cache), ref(x[:, :11], cache=ref_cache)) <= TOL
    for i in range(11, 20):  # past the window of 8: mlx-lm's rotating cache has wrapped
        assert _diff(ours(x[:, i : i + 1], cache), ref(x[:, i : i + 1], cache=ref_cache)) <= TOL


@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
def test_the_sliding_window_changes_the_logits_past_it(model_type: str) -> None:
    """The parity above is not vacuous: without the window the long prompt's logits differ."""
    config = tiny_config(model_type)
    weights = random_weights(config, seed=1)
    windowed = _ours(config, weights)
    unlimited = _ours({**config, "sliding_window": 4096, "max_position_embeddings": 8192}, weights)
    x = _tokens(20)
    assert _diff(windowed(x[:, :8]), unlimited(x[:, :8])) <= TOL  # within the window: same
    assert _diff(windowed(x), unlimited(x)) > 1e-3


def test_mistral_window_without_layer_types_applies_to_every_layer() -> None:
    """transformers' reading of Mistral configs (mlx-lm's llama ignores such a window)."""
    config = {**tiny_config("mistral"), "layer_types": None}
    weights = random_weights(config, seed=2)
    every = _ours(config, weights)
    listed = _ours({**config, "layer_types": ["sliding_attention"] * 2}, weights)
    full = _ours({**config, "sliding_window": None}, weights)
    x = _tokens(16, seed=4)
    assert _diff(every(x), listed(x)) <= TOL
    assert _diff(every(x), full(x)) > 1e-3


def test_phi3_sliding_window_is_applied_in_prompt_and_decode() -> None:
    """mlx-lm's phi3 ignores ``sliding_window`` (transformers' does not); the windowed path
    itself is checked against mlx-lm by Gemma 3 and Mistral above."""
    config = tiny_config("phi3", sliding_window=6)
    weights = random_weights(config, seed=3)
    ours = _ours(config, weights)
    full = _ours({**config, "sliding_window": None}, weights)
    x = _tokens(14, seed=5)
    assert _diff(ours(x[:, :6]), full(x[:, :6])) <= TOL
    assert _diff(ours(x), full(x)) > 1e-3
    cache = ours.make_cache()
    ours(x[:, :10], cache)
    for i in range(10, 14):
        assert _diff(ours(x[:, i : i + 1], cache)[0, -1], ours(x[:, : i + 1])[0, -1]) <= TOL


def test_gemma3_vision_config_loads_its_text_part() -> None:
    """A ``gemma3`` checkpoint: text config nested, text tensors under ``language_model.``."""
    text = tiny_config("gemma3_text")
    weights = random_weights(text, seed=4)
    config = {
        "model_type": "gemma3",
        "vocab_size": text.pop("vocab_size"),
        "text_config": text,
        "vision_config": {"hidden_size": 8},
    }
    nested = {f"language_model.{k}": v for k, v in weights.items()}
    nested["vision_tower.encoder.weight"] = mx.zeros((2, 2))
    nested["multi_modal_projector.mm_input_projection_weight"] = mx.zeros((2, 2))
    ours = _ours(config, nested)
    ref_module = importlib.import_module("mlx_lm.models.gemma3")
    ref = ref_module.Model(ref_module.ModelArgs.from_dict(config))
    ref.load_weights(list(ref.sanitize(dict(nested)).items()))
    x = _tokens(12)
    assert _diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("model_type", ARCHS)
def test_packed_spans_equal_separate_runs(model_type: str) -> None:
    """A decode token past the window and a prefill chunk in one packed step match solo runs."""
    ours, _ = _pair(model_type)
    a, b = _tokens(13, seed=4), _tokens(10, seed=5)
    solo_a, solo_b = ours.make_cache(), ours.make_cache()
    ours(a[:, :12], solo_a)
    want_a = ours(a[:, 12:13], solo_a)[0, -1]
    want_b = ours(b, solo_b)[0, -1]
    cache_a, cache_b = ours.make_cache(), ours.make_cache()
    ours(a[:, :12], cache_a)
    packed = mx.concatenate([a[:, 12:13], b], axis=1)
    logits = ours.unembed(
        ours.hidden(packed, SpanLayout([Span(0, 1, cache_a), Span(1, 10, cache_b)]))
    )
    assert _diff(logits[0, 0], want_a) <= TOL
    assert _diff(logits[0, 10], want_b) <= TOL


# ---- through the engine: the padded batch cache ----


@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
def test_batch_layout_steps_past_the_window_equal_solo_logits(model_type: str) -> None:
    """The engine's three kinds of step, each crossing the window of 8: prefill only, decode
    beside a prefill chunk (one row dummy), and ragged decode rows; logits against solo runs."""
    ours, _ = _pair(model_type)
    a, b = _tokens(14, seed=6)[0], _tokens(14, seed=7)[0]
    cache = BatchKVCache(ours.num_layers)

    def step(tokens: mx.array, **kw: Any) -> mx.array:
        layout = BatchLayout.build(cache, capacity_rows=2, positions=256, **kw)
        if kw.get("prefill"):
            return ours.unembed(ours.hidden(tokens[None], layout))[0]
        return ours.unembed(ours.hidden(tokens, layout))  # a flat decode step

    def solo(x: mx.array) -> mx.array:
        return ours(x[None])[0, -1]

    first = step(
        mx.concatenate([a[:12], b[:9]]),
        lengths=None,
        prefill=[
            PrefillChunk(start=0, length=12, row=0, offset=0),
            PrefillChunk(start=12, length=9, row=1, offset=0),
        ],
    )
    assert _diff(first[11], solo(a[:12])) <= TOL
    assert _diff(first[20], solo(b[:9])) <= TOL
    mixed = step(  # row 1's chunk starts past the window: its first keys are not read
        mx.concatenate([a[12:13], b[9:10], b[9:14]]),  # row 1's decode token is a dummy
        lengths=[12, 9],
        decoding=[0],
        prefill=[PrefillChunk(start=2, length=5, row=1, offset=9)],
    )
    assert _diff(mixed[0], solo(a[:13])) <= TOL
    assert _diff(mixed[6], solo(b[:14])) <= TOL
    decode = step(mx.stack([a[13], b[0]]), lengths=[13, 14], decoding=[0, 1], prefill=[])
    assert decode.shape == (2, ours.args.vocab_size)  # flat: [rows] in, [rows, ...] out
    assert _diff(decode[0], solo(a[:14])) <= TOL
    assert _diff(decode[1], solo(mx.concatenate([b[:14], b[:1]]))) <= TOL


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_tiny_folder(tmp_path_factory.mktemp("arch") / "m", request.param)
    return load_model(folder, execution="dense")


PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11], [12, 300, 8], list(range(20, 41))]


def _run(
    engine: ModelEngine, late: dict[int, SequenceRequest] | None = None
) -> dict[int, list[int]]:
    """Step until idle; ``late[step]`` joins before that step."""
    late = dict(late or {})
    out: dict[int, list[int]] = {}
    for step in range(200):
        if step in late:
            engine.add(late.pop(step))
        if not engine.has_work() and not late:
            break
        events: list[TokenEvent] = engine.step() if engine.has_work() else []
        for ev in events:
            if ev.token is not None:
                out.setdefault(ev.seq_id, []).append(ev.token)
            if ev.finish is not None:
                engine.remove(ev.seq_id)
    return out


def _request(seq_id: int, prompt: list[int], n: int = 12) -> SequenceRequest:
    return SequenceRequest(seq_id=seq_id, prompt=tuple(prompt), sampling=GREEDY, max_tokens=n)


def _greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    model, cache = loaded.model, loaded.model.make_cache()
    logits = model(mx.array(prompt)[None], cache)
    out: list[int] = []
    for _ in range(n):
        token = int(np.array(mx.argmax(logits[0, -1])))
        out.append(token)
        if token in loaded.tokenizer.eos_ids:
            break
        logits = model(mx.array([[token]]), cache)
    return out


def test_engine_sequence_equals_the_plain_greedy_loop(loaded: LoadedModel) -> None:
    engine = ModelEngine(loaded)
    engine.add(_request(1, PROMPTS[0]))
    assert _run(engine)[1] == _greedy(loaded, PROMPTS[0], 12)


def test_engine_batched_sequences_equal_solo_runs(loaded: LoadedModel) -> None:
    solo = []
    for i, prompt in enumerate(PROMPTS):
        engine = ModelEngine(loaded)
        engine.add(_request(i, prompt))
        solo.append(_run(engine)[i])
    # Small prefill chunks: late prompts are prefilled past the window beside decoding rows
    # of different lengths.
    engine = ModelEngine(loaded, prefill_chunk=5)
    engine.add(_request(0, PROMPTS[0]))
    out = _run(engine, late={3: _request(1, PROMPTS[1]), 4: _request(2, PROMPTS[2])})
    assert [out[i] for i in range(3)] == solo


def test_unsupported_model_type_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        architecture({"model_type": "gemma2"})
    message = str(info.value)
    assert "'gemma2'" in message
    for name in ("gemma3", "gemma3_text", "llama", "mistral", "ministral", "phi3", "qwen3"):
        assert name in message


def test_gemma3_vision_folder_loads_and_is_described_by_its_text_model(tmp_path: Path) -> None:
    folder = make_tiny_folder(tmp_path / "g", "gemma3_text")
    text = json.loads((folder / "config.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    assert isinstance(weights, dict)
    want = load_model(folder, execution="dense").model(_tokens(12) % text["vocab_size"])
    nested = {f"language_model.{k}": v for k, v in weights.items()}
    nested["vision_tower.vision_model.post_layernorm.weight"] = mx.ones((8,))
    mx.save_safetensors(str(folder / "model.safetensors"), nested)
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {**text, "model_type": "gemma3_text"},
        "vision_config": {"hidden_size": 8},
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, execution="dense")
    assert _diff(loaded.model(_tokens(12) % text["vocab_size"]), want) <= TOL
    assert loaded.context_length == 256
    shown = describe(folder)
    assert (shown.context_length, shown.embedding_length) == (256, 64)


def test_ministral3_serves_its_original_context_where_the_query_scale_is_one(
    tmp_path: Path,
) -> None:
    folder = make_tiny_folder(tmp_path / "m", "ministral3")
    assert load_model(folder, execution="dense").context_length == 128
    unscaled = {**tiny_config("ministral3"), "rope_parameters": {"rope_theta": 1e6}}
    assert architecture(unscaled).ModelArgs.from_dict(unscaled).max_position_embeddings == 2048


def test_mistral3_vision_config_loads_its_text_part() -> None:
    text = tiny_config("ministral3")
    weights = random_weights(text, seed=6)
    config = {"model_type": "mistral3", "text_config": text, "vision_config": {}}
    nested = {f"language_model.{k}": v for k, v in weights.items()}
    nested["vision_tower.transformer.ln.weight"] = mx.zeros((4,))
    nested["multi_modal_projector.linear_1.weight"] = mx.zeros((4, 4))
    ours = _ours(config, nested)
    ref_module = importlib.import_module("mlx_lm.models.mistral3")
    ref = ref_module.Model(ref_module.ModelArgs.from_dict(config))
    ref.load_weights(list(ref.sanitize(dict(nested)).items()))
    x = _tokens(20)
    assert _diff(ours(x), ref(x)) <= TOL


def test_mistral3_with_another_text_model_is_named() -> None:
    config = {"model_type": "mistral3", "text_config": {"model_type": "mistral4"}}
    with pytest.raises(ModelLoadError, match="'mistral4'"):
        architecture(config).ModelArgs.from_dict(config)


@pytest.mark.parametrize("model_type", ARCHS)
def test_fused_projections_give_the_same_logits(model_type: str) -> None:
    """The engine fuses Q/K/V and gate/up on CUDA (``runtime.models.projections``); the
    models call them through ``qkv``/``gate_up``. Phi-3's checkpoints come fused already."""
    ours, _ = _pair(model_type)
    x = _tokens(20)
    want = ours(x)
    fused = fuse_projections(ours)
    assert fused == (0 if model_type == "phi3" else 2 * ours.num_layers)
    assert _diff(ours(x), want) <= TOL
