"""The tensor check every source goes through (``runtime.models.checkpoint``), and the one
parameter count and quantization label."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest

from runtime.errors import ModelLoadError
from runtime.formats.safetensors import TensorSet
from runtime.models.checkpoint import (
    check_weights,
    count_parameters,
    quantization_label,
)
from runtime.testing.models import quantize_weights, random_weights, tiny_config

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def config() -> dict[str, Any]:
    return tiny_config("qwen2")  # has real q/k/v biases next to quantization biases


def _tensors(
    weights: dict[str, mx.array], quant: dict[str, tuple[int, int]] | None = None
) -> TensorSet:
    return TensorSet(
        tensors=dict(weights), origins=dict.fromkeys(weights, "w.safetensors"), quant=quant or {}
    )


def test_missing_tensor_is_named(config: dict[str, Any]) -> None:
    w = random_weights(config)
    del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"m: missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        check_weights("m", config, _tensors(w))


def test_wrong_shape_names_file_and_tensor(config: dict[str, Any]) -> None:
    w = random_weights(config)
    w["model.norm.weight"] = mx.zeros((7,))
    with pytest.raises(ModelLoadError, match=r"w\.safetensors.*model\.norm\.weight.*shape"):
        check_weights("m", config, _tensors(w))


def test_unexpected_tensor_is_named(config: dict[str, Any]) -> None:
    w = random_weights(config)
    w["model.layers.0.mystery.weight"] = mx.zeros((3,))
    with pytest.raises(ModelLoadError, match=r"w\.safetensors: unexpected tensor .*mystery"):
        check_weights("m", config, _tensors(w))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Unbounded, it would size the build of the architecture: 10**12 layers.
        ({"num_hidden_layers": 10**12}, "num_hidden_layers = 1000000000000 but the model has"),
        ({"num_attention_heads": 0}, "invalid config.json"),
        ({"intermediate_size": 10**13}, "invalid config.json"),
    ],
)
def test_impossible_config_values_are_model_load_errors(
    config: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    w = random_weights(config)
    with pytest.raises(ModelLoadError, match=rf"^m: .*{message}"):
        check_weights("m", {**config, **change}, _tensors(w))


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ModelLoadError, match=r"'gpt9'.*llama.*qwen2.*qwen3"):
        check_weights("m", {"model_type": "gpt9"}, _tensors({}))


def test_quantization_comes_from_metadata_then_config_then_shapes(config: dict[str, Any]) -> None:
    q = quantize_weights(config, random_weights(config), bits=4, group_size=32)
    _, implied = check_weights("m", config, _tensors(q))
    assert set(implied.values()) == {(4, 32)}
    # 4 bits in groups of 32 packs like 8 bits in groups of 64 would not: a wrong declaration
    # (metadata, or config.json when there is none) is refused with the tensor named.
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}\.weight.*does not match.*\(8, 64\)"):
        check_weights("m", config, _tensors(q, {Q_PROJ: (8, 64)}))
    declared = {**config, "quantization": {"bits": 8, "group_size": 64}}
    with pytest.raises(ModelLoadError, match=r"does not match its quantization \(8, 64\)"):
        check_weights("m", declared, _tensors(q))


def test_quantization_parts_must_come_together(config: dict[str, Any]) -> None:
    q = quantize_weights(config, random_weights(config), bits=4, group_size=32)
    del q[f"{Q_PROJ}.biases"]
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}\.biases' missing beside"):
        check_weights("m", config, _tensors(q))
    q = quantize_weights(config, random_weights(config), bits=4, group_size=32)
    q[f"{Q_PROJ}.scales"] = q[f"{Q_PROJ}.scales"][:, :1]
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}"):
        check_weights("m", config, _tensors(q))


def test_sanitize_drops_what_the_architecture_does_not_keep(config: dict[str, Any]) -> None:
    tied = {**config, "tie_word_embeddings": True}
    w = random_weights(tied)
    extra = {"lm_head.weight": w["model.embed_tokens.weight"], "x.rotary_emb.inv_freq": mx.ones(4)}
    weights, _ = check_weights("m", tied, _tensors(w | extra))
    assert set(weights) == set(w)


def test_parameters_count_unpacked_values_without_scales(config: dict[str, Any]) -> None:
    dense = random_weights(config)
    n = sum(a.size for a in dense.values())
    assert count_parameters(dense, {}) == n
    q = quantize_weights(config, dense, bits=4, group_size=32)
    _, quant = check_weights("m", config, _tensors(q))
    assert count_parameters(q, quant) == n


def test_quantization_label() -> None:
    floats = {"a": mx.zeros(4, dtype=mx.bfloat16), "b": mx.zeros(4, dtype=mx.bfloat16)}
    assert quantization_label(floats | {"c": mx.zeros(4)}, {}) == "BF16"
    assert quantization_label({}, {}) == "F32"
    quant = {"x": (4, 32), "y": (4, 32), "z": (8, 64)}
    assert quantization_label({}, quant) == "int4 g32"
    # A tie goes to the smaller (bits, group), whatever order the modules came in.
    tie = {"x": (8, 64), "y": (4, 64)}
    assert quantization_label({}, tie) == quantization_label({}, dict(reversed(tie.items())))
    assert quantization_label({}, tie) == "int4 g64"
