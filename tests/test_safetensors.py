"""Safetensors reading (``runtime.formats.safetensors``): the three-phase read and header checks."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

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


def _raw(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


_GOOD = {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data_offsets": ["0", 32]}, "invalid data_offsets"),
        ({"data_offsets": [16, 8]}, "invalid data_offsets"),
        ({"data_offsets": [0, True]}, "invalid data_offsets"),
        ({"shape": "2x4"}, "invalid data_offsets"),
        ({"shape": [2, -4]}, "invalid data_offsets"),
        ({"shape": [2, 8]}, "needs 64 bytes, its data_offsets hold 32"),
        ({"dtype": "F16"}, "needs 16 bytes, its data_offsets hold 32"),
    ],
)
def test_malformed_tensor_entries_are_named(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    header = {"a.weight": {**_GOOD["a.weight"], **change}}
    path = _raw(tmp_path / "w.safetensors", header, bytes(32))
    with pytest.raises(ModelLoadError, match=rf"w\.safetensors: .*'a\.weight'.*{message}"):
        read_tensors([path])


def test_malformed_metadata_is_a_model_load_error(tmp_path: Path) -> None:
    path = _raw(tmp_path / "w.safetensors", {**_GOOD, "__metadata__": ["x"]}, bytes(32))
    with pytest.raises(ModelLoadError, match="__metadata__"):
        read_tensors([path])
    header = {
        **_GOOD,
        "a.weight.scale": {"dtype": "F32", "shape": [2, 1], "data_offsets": [32, 40]},
        "__metadata__": {"quant_type": "int4", "group_size": "lots"},
    }
    path = _raw(tmp_path / "q.safetensors", header, bytes(40))
    with pytest.raises(ModelLoadError, match=r"q\.safetensors: invalid group_size 'lots'"):
        read_tensors([path])


def test_random_header_damage_loads_or_gives_model_load_error(tmp_path: Path) -> None:
    """Seeded damage to a small file's header: it reads, or it is a ModelLoadError."""
    source = _save(tmp_path / "ok.safetensors", {"a.weight": mx.ones((4, 8)), "b": mx.zeros(8)})
    blob = source.read_bytes()
    end = 8 + int.from_bytes(blob[:8], "little")
    rng = random.Random(7)
    path = tmp_path / "bad.safetensors"
    for _ in range(200):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(8, end)] = rng.choice(b'0123456789[]{}",:-.eE x')
        path.write_bytes(bytes(damaged))
        try:
            mx.eval(list(read_tensors([path]).tensors.values()))
        except ModelLoadError as exc:
            assert str(path) in str(exc)  # noqa: PT017 - the outcome of a loop iteration
