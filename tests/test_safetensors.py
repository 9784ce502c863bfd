"""Safetensors reading (``runtime.formats.safetensors``): the three-phase read and header checks."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from runtime.errors import ModelLoadError
from runtime.formats.safetensors import read_tensors
from runtime.testing.models import ollama_names, quantize_weights, random_weights, tiny_config


def _save(path: Path, weights: dict[str, mx.array], metadata: dict[str, str] | None = None) -> Path:
    mx.save_safetensors(str(path), weights, metadata=metadata or {})
    return path


@pytest.fixture
def config() -> dict[str, object]:
    return tiny_config("qwen2")  # has real q/k/v biases next to quantization biases


def test_three_phase_maps_ollama_names_and_keeps_layer_biases(tmp_path: Path, config: dict) -> None:
    q = quantize_weights(config, random_weights(config), bits=4, group_size=32)
    path = _save(
        tmp_path / "w.safetensors", ollama_names(q), {"quant_type": "int4", "group_size": "32"}
    )
    got = read_tensors([path])
    assert "model.layers.0.self_attn.q_proj.scales" in got.tensors
    assert "model.layers.0.self_attn.q_proj.biases" in got.tensors  # quantization bias
    assert "model.layers.0.self_attn.q_proj.bias" in got.tensors  # the layer's own bias, kept
    assert got.quant["model.layers.0.self_attn.q_proj"] == (4, 32)
    assert set(got.tensors) == set(q)


def test_truncated_safetensors_names_file(tmp_path: Path, config: dict) -> None:
    path = _save(tmp_path / "w.safetensors", random_weights(config))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"w\.safetensors.*truncated.*tensor"):
        read_tensors([path])


def test_garbage_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ModelLoadError, match=r"bad\.safetensors"):
        read_tensors([path])
