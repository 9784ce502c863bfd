"""Building and loading models (``runtime.models.loader``): execution modes, sharded files,
quantized folders, load progress."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from runtime.errors import ModelLoadError
from runtime.formats.safetensors import TensorSet, read_tensors
from runtime.models.loader import build_model, load_model
from runtime.testing.models import (
    make_tiny_folder,
    ollama_names,
    quantize_weights,
    random_weights,
    tiny_config,
)


def _save(path: Path, weights: dict[str, mx.array], metadata: dict[str, str] | None = None) -> Path:
    mx.save_safetensors(str(path), weights, metadata=metadata or {})
    return path


def _logits(model: object, n: int = 9) -> np.ndarray:
    x = mx.array(np.arange(3, 3 + n)[None], dtype=mx.int32)
    return np.array(model(x))  # type: ignore[operator]


@pytest.fixture
def config() -> dict[str, object]:
    return tiny_config("qwen2")  # has real q/k/v biases next to quantization biases


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 64)])
def test_quantized_checkpoint_runs_dense_and_quantized(
    tmp_path: Path, config: dict, bits: int, group: int
) -> None:
    q = quantize_weights(config, random_weights(config), bits=bits, group_size=group)
    path = _save(tmp_path / "w.safetensors", ollama_names(q))
    tensors = read_tensors([path])
    dense, label = build_model(config, tensors, execution="dense")
    quant, _ = build_model(config, read_tensors([path]), execution="quantized")
    assert label == f"int{bits} g{group}"
    assert "QuantizedLinear" in type(quant.model.layers[0].self_attn.q_proj).__name__
    assert quant.model.layers[0].self_attn.q_proj.scales.dtype == mx.float32
    assert np.max(np.abs(_logits(dense) - _logits(quant))) < 1e-3


def test_sharded_files_merge(tmp_path: Path, config: dict) -> None:
    w = random_weights(config)
    keys = sorted(w)
    a = _save(tmp_path / "a.safetensors", {k: w[k] for k in keys[: len(keys) // 2]})
    b = _save(tmp_path / "b.safetensors", {k: w[k] for k in keys[len(keys) // 2 :]})
    model, label = build_model(config, read_tensors([a, b]), execution="dense")
    assert label == "F32"
    ref, _ = build_model(config, TensorSet(tensors=w, origins={}, quant={}), execution="dense")
    assert np.array_equal(_logits(model), _logits(ref))


def test_sharded_folder_with_index_loads(tmp_path: Path) -> None:
    import json

    from runtime.models.loader import load_model
    from runtime.testing.models import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "m", "llama")
    whole = mx.load(str(folder / "model.safetensors"))
    assert isinstance(whole, dict)
    keys = sorted(whole)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, names in shards.items():
        mx.save_safetensors(str(folder / name), {k: whole[k] for k in names})
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: n for n, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(folder)
    assert loaded.parameters > 0
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"00002-of-00002.*missing"):
        load_model(folder)


def test_mlx_quantized_folder_loads_with_float32_scales(tmp_path: Path) -> None:
    from runtime.models.loader import load_model
    from runtime.testing.models import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "q", "llama", quantize=(4, 32))
    loaded = load_model(folder, execution="quantized")
    assert loaded.quantization == "int4 g32"
    assert loaded.model.model.layers[0].mlp.up_proj.scales.dtype == mx.float32
    dense = load_model(folder, execution="dense")
    assert dense.execution == "dense"
    assert np.max(np.abs(_logits(loaded.model) - _logits(dense.model))) < 1e-3


def test_load_progress_reports_bytes_and_tensors(tmp_path: Path) -> None:
    from runtime.models.loader import LoadProgress, load_model
    from runtime.testing.models import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "m", "llama")
    seen: list[LoadProgress] = []
    load_model(folder, progress=seen.append)
    assert [p.phase for p in seen] == ["read", "build", "ready"]
    reads = [p for p in seen if p.phase == "read"]
    assert reads[-1].done_bytes == reads[-1].total_bytes > 0
    assert reads[-1].done_items == reads[-1].total_items > 0
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


@pytest.mark.parametrize(
    "value", ["abc", None, 1.5, [4096], -5, 0, True, float("nan"), float("inf")]
)
def test_a_config_with_a_bad_context_length_is_a_clear_load_error(
    tmp_path: Path, value: object
) -> None:
    folder = make_tiny_folder(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="max_position_embeddings"):
        load_model(folder)
