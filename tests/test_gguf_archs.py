"""GGUF files of Gemma 3 and Phi-3: metadata to config, llama.cpp's tensor conventions, logits.

Tiny files are written the way llama.cpp's converter writes these architectures
(``tests.gguf_writer``): Gemma 3's norms as ``1 + weight``, one global layer in six and its
attention scale left to code; Phi-3's fused projections, partial RoPE and longrope factors as
tensors. The references are mlx-lm's models on the original weights (F32 files) or on
``write_folder`` of the file (quantized files).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import numpy as np
import pytest

from runtime.errors import ModelLoadError
from runtime.formats.gguf import read_gguf, write_folder
from runtime.models.loader import load_model
from runtime.testing.models import random_weights, tiny_config
from tests import gguf_writer as gw

GPT2_TOKENS = gw.gpt2_tokenizer_metadata()
VOCAB = len(GPT2_TOKENS["tokenizer.ggml.tokens"])
REFERENCE = {"gemma3_text": "gemma3_text", "phi3": "phi3"}
# What llama.cpp assumes of Gemma 3 instead of reading it: one global layer in six, and
# attention scaled by the head size.
GEMMA3 = {"num_hidden_layers": 6, "sliding_window_pattern": 6, "query_pre_attn_scalar": 32}
OVERRIDES: dict[str, dict[str, Any]] = {"gemma3_text": GEMMA3, "phi3": {"sliding_window": 6}}


def _model(arch: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = tiny_config(arch, vocab_size=VOCAB, **OVERRIDES[arch])
    weights = {k: np.array(v) for k, v in random_weights(config, seed=seed).items()}
    return config, weights


def _ids(n: int = 14, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=(1, n)), dtype=mx.int32)


def _diff(a: mx.array, b: mx.array) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32)).max())


def test_gemma3_config_from_metadata(tmp_path: Path) -> None:
    config, weights = _model("gemma3_text")
    path = tmp_path / "g.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    got = read_gguf(path).config
    assert got["model_type"] == "gemma3_text"
    assert got["architectures"] == ["Gemma3ForCausalLM"]
    assert (got["sliding_window"], got["sliding_window_pattern"]) == (8, 6)
    assert (got["rope_theta"], got["rope_local_base_freq"]) == (1e6, 1e4)
    assert got["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert (got["head_dim"], got["query_pre_attn_scalar"]) == (32, 32)
    assert got["tie_word_embeddings"] is True


def test_phi3_config_from_metadata_and_factor_tensors(tmp_path: Path) -> None:
    config, weights = _model("phi3")
    path = tmp_path / "p.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    got = read_gguf(path).config
    assert got["model_type"] == "phi3"
    assert got["partial_rotary_factor"] == 0.75
    assert got["original_max_position_embeddings"] == 64
    assert got["sliding_window"] == 6
    assert got["rope_scaling"]["type"] == "longrope"
    assert got["rope_scaling"]["long_factor"] == pytest.approx(
        config["rope_scaling"]["long_factor"]
    )
    assert got["tie_word_embeddings"] is False


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_f32_gguf_logits_equal_mlx_lm_on_the_original_weights(tmp_path: Path, arch: str) -> None:
    config, weights = _model(arch)
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    ours = load_model(path, execution="dense").model
    module = importlib.import_module(f"mlx_lm.models.{REFERENCE[arch]}")
    ref = module.Model(module.ModelArgs.from_dict(config))
    tensors = {k: mx.array(v) for k, v in weights.items()}
    if hasattr(ref, "sanitize"):
        tensors = ref.sanitize(tensors)
    ref.load_weights(list(tensors.items()))
    x = _ids(6)  # mlx-lm's phi3 has no sliding window: stay within ours (6)
    assert _diff(ours(x), ref(x)) <= 1e-4
    if arch == "gemma3_text":  # past the window of 8
        x = _ids(20, seed=1)
        assert _diff(ours(x), ref(x)) <= 1e-4


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
@pytest.mark.parametrize("execution", ["quantized", "dense"])
def test_quantized_gguf_logits_equal_mlx_lm_on_write_folder(
    tmp_path: Path, arch: str, execution: Literal["dense", "quantized"]
) -> None:
    import mlx_lm

    config, weights = _model(arch, seed=2)
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS)
    contents = read_gguf(path)
    assert "quantization" in contents.config
    ref = mlx_lm.load(str(write_folder(contents, tmp_path / "folder")))[0]
    x = _ids(6, seed=3)
    assert _diff(load_model(path, execution=execution).model(x), ref(x)) <= 1e-4


def test_phi3_factor_tensor_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    config, weights = _model("phi3")
    path = tmp_path / "p.gguf"
    bad = {"rope_factors_long.weight": (np.ones(5, np.float32), "F32")}
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, extra_tensors=bad)
    with pytest.raises(ModelLoadError, match=r"'rope_factors_long\.weight' must hold 6"):
        read_gguf(path)


def test_partial_rotary_embeddings_outside_phi3_are_refused(tmp_path: Path) -> None:
    config = tiny_config("llama", vocab_size=VOCAB)
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    path = tmp_path / "l.gguf"
    meta = {"llama.rope.dimension_count": 8}
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, extra_metadata=meta)
    with pytest.raises(ModelLoadError, match="rotary dimensions 8 of head size 16"):
        read_gguf(path)


def test_ollama_gemma3_file_runs_its_text_model(tmp_path: Path) -> None:
    """Ollama's Gemma 3 files: vision tensors beside the text model's, image tokens past the
    vocabulary, a per-layer pattern, other RoPE base keys, no norm epsilon, and no x8 RoPE
    scaling although the context is 128K."""
    spm = gw.spm_tokenizer_metadata()
    vocab = len(spm["tokenizer.ggml.tokens"])
    tokenizer = {
        **spm,
        "tokenizer.ggml.tokens": [*spm["tokenizer.ggml.tokens"], "<image_soft_token>"],
        "tokenizer.ggml.token_type": np.append(
            spm["tokenizer.ggml.token_type"], np.int32(3)
        ).astype(np.int32),
        "tokenizer.ggml.scores": np.append(spm["tokenizer.ggml.scores"], np.float32(0)),
        "tokenizer.ggml.add_space_prefix": False,
    }
    overrides = {**GEMMA3, "max_position_embeddings": 131072, "rope_scaling": None}
    config = tiny_config("gemma3_text", vocab_size=vocab, **overrides)
    config["rope_theta"], config["rope_local_base_freq"] = 500000.0, 20000.0
    weights = {k: np.array(v) for k, v in random_weights(config, seed=5).items()}
    tensors = {}
    for name, array in weights.items():
        gguf = gw.gguf_name(name, "gemma3")
        tensors[gguf] = (array + 1.0 if gguf.endswith("norm.weight") else array, "F32")
    tensors["v.blk.0.attn_q.weight"] = (np.zeros((32, 32), np.float32), "F32")
    tensors["mm.mm_input_projection.weight"] = (np.zeros((32, 64), np.float32), "F32")
    meta = gw.model_metadata(config)
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.type"):
        meta.pop(f"gemma3.{key}", None)
    pattern = [(i + 1) % 3 != 0 for i in range(6)]  # one global layer in three
    meta |= {
        "gemma3.attention.sliding_window_pattern": pattern,
        "gemma3.rope.global.freq_base": 500000.0,
        "gemma3.rope.local.freq_base": 20000.0,
        "gemma3.vision.block_count": 1,
    }
    path = tmp_path / "ollama.gguf"
    gw.write_gguf(path, {**meta, **tokenizer}, tensors)

    contents = read_gguf(path)
    assert contents.config["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert contents.config["layer_types"][2] == "full_attention"
    assert not any(k.startswith(("v.", "mm.", "vision")) for k in contents.weights)
    ours = load_model(path, execution="dense")
    assert ours.tokenizer.vocab_size == vocab
    module = importlib.import_module("mlx_lm.models.gemma3_text")
    ref_config = {
        **config,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
    }
    ref = module.Model(module.ModelArgs.from_dict(ref_config))
    ref.load_weights(list(ref.sanitize({k: mx.array(v) for k, v in weights.items()}).items()))
    x = _ids(20, seed=6) % vocab
    assert _diff(ours.model(x), ref(x)) <= 1e-4


def test_phi3_file_without_scaling_as_ollama_writes_it(tmp_path: Path) -> None:
    """Ollama's converter: empty factor tensors and zeros for what the HF config leaves out."""
    config, weights = _model("phi3")
    config = {**config, "rope_scaling": None, "partial_rotary_factor": 1.0}
    config.pop("sliding_window")
    meta = {"phi3.attention.sliding_window": 0, "phi3.rope.scaling.original_context_length": 0}
    empty = np.zeros(0, np.float32)
    factors = {
        "rope_factors_long.weight": (empty, "F32"),
        "rope_factors_short.weight": (empty, "F32"),
    }
    path = tmp_path / "p.gguf"
    gw.write_model_gguf(
        path,
        config,
        weights,
        GPT2_TOKENS,
        types=lambda _: "F32",
        extra_metadata=meta,
        extra_tensors=factors,
    )
    got = read_gguf(path).config
    assert "rope_scaling" not in got
    assert "sliding_window" not in got
    assert got["original_max_position_embeddings"] == got["max_position_embeddings"]
    ours = load_model(path, execution="dense").model
    module = importlib.import_module("mlx_lm.models.phi3")
    ref = module.Model(module.ModelArgs.from_dict(config))
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    x = _ids(12)
    assert _diff(ours(x), ref(x)) <= 1e-4


def test_gemma3_27b_attention_scale_is_width_over_heads(tmp_path: Path) -> None:
    """llama.cpp keys Gemma 3 27B's scale (hidden / heads, not head_dim) on its 62 layers."""
    config = tiny_config("gemma3_text", vocab_size=VOCAB, num_hidden_layers=62, hidden_size=32)
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    path = tmp_path / "g.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    got = read_gguf(path).config
    assert (got["head_dim"], got["query_pre_attn_scalar"]) == (32, 8)
