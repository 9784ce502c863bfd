"""Fused projections (runtime/models/projections.py) and the many-row quantized layer
(runtime/models/quantized_linear.py): same outputs as the layers they replace."""

from __future__ import annotations

import io
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from runtime.models import quantized_linear
from runtime.models.projections import (
    DenseProjection,
    FusedLinear,
    fuse_projections,
    gate_up,
    pretranspose_dense,
    qkv,
)
from runtime.models.quantized_linear import QuantizedLinear, adopt, adopt_quantized_linears


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=bias)
        self.k_proj = nn.Linear(64, 32, bias=bias)
        self.v_proj = nn.Linear(64, 32, bias=bias)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(64, 128, bias=False)
        self.up_proj = nn.Linear(64, 128, bias=False)


class _Layer(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.self_attn = _Attention(bias)
        self.mlp = _MLP()


class _Model(nn.Module):
    FUSABLE_PROJECTIONS = True

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.layers = [_Layer(bias), _Layer(bias)]


def _outputs(model: _Model, x: mx.array) -> list[np.ndarray]:
    out = []
    for layer in model.layers:
        out += [*qkv(layer.self_attn, x), *gate_up(layer.mlp, x)]
    return [np.array(a) for a in out]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_fused_projections_give_the_separate_outputs(bias: bool, quantize: bool) -> None:
    model = _Model(bias)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        adopt_quantized_linears(model)
    mx.eval(model.parameters())
    x = mx.random.normal((3, 1, 64))
    before = _outputs(model, x)
    assert fuse_projections(model) == 4  # two groups in each of two layers
    layer = model.layers[0]
    assert "q_proj" not in layer.self_attn
    assert "gate_proj" not in layer.mlp
    assert isinstance(layer.self_attn["qkv_proj"], FusedLinear)
    fused_kind = QuantizedLinear if quantize else nn.Linear
    assert isinstance(layer.self_attn["qkv_proj"].proj, fused_kind)
    after = _outputs(model, x)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_group_of_mixed_kinds_is_left_separate() -> None:
    model = _Model()
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p.endswith("q_proj"))
    assert fuse_projections(model) == 2  # only the MLPs: q is quantized, k and v are not
    assert "q_proj" in model.layers[0].self_attn
    assert "gate_up_proj" in model.layers[0].mlp


@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 1, 64), (5, 64), (8, 64), (12, 1, 64)])
def test_quantized_linear_reshapes_and_pads_without_changing_outputs(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = nn.QuantizedLinear(64, 48, bias=True, group_size=32, bits=4)
    mx.eval(layer.parameters())
    x = mx.random.normal(shape)
    expected = np.array(layer(x))
    ours = adopt(layer)
    assert ours["weight"] is layer["weight"] or np.array_equal(
        np.array(ours["weight"]), np.array(layer["weight"])
    )
    # Off CUDA the layer is MLX's; force the CUDA form so the reshape and padding run here.
    monkeypatch.setattr(quantized_linear, "on_cuda", lambda: True)
    got = ours(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5)


def test_reshaping_applies_only_where_mlx_would_take_its_slow_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quantized_linear, "on_cuda", lambda: True)
    reshaped = quantized_linear._reshaped
    assert not reshaped(mx.zeros((1, 1, 64)))  # one row: MLX's matrix-vector kernel
    assert reshaped(mx.zeros((16, 1, 64)))  # one token per sequence: flattened
    assert reshaped(mx.zeros((4, 64)))  # few rows: padded to the tiled kernel's 8
    assert not reshaped(mx.zeros((16, 64)))  # already what the tiled kernel takes
    monkeypatch.setattr(quantized_linear, "on_cuda", lambda: False)
    assert not reshaped(mx.zeros((16, 1, 64)))


def test_a_model_that_does_not_say_it_can_be_fused_is_left_alone() -> None:
    class _Other(_Model):
        FUSABLE_PROJECTIONS = False

    model = _Other()
    assert fuse_projections(model) == 0
    assert "q_proj" in model.layers[0].self_attn


def _parameter_names(model: nn.Module) -> list[str]:
    pairs = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    return sorted(name for name, _ in pairs)


def _graph(out: mx.array) -> str:
    text = io.StringIO()
    mx.export_to_dot(text, out)
    return text.getvalue()


@pytest.mark.parametrize("bias", [False, True])
def test_pretransposed_layers_give_the_same_outputs_without_a_transpose_node(bias: bool) -> None:
    model = _Model(bias)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p.endswith("up_proj"))
    mx.eval(model.parameters())
    x = mx.random.normal((3, 64))
    before = _outputs(model, x)
    names = _parameter_names(model)
    # Every dense layer but the quantized up projections (two per layer, two layers).
    assert pretranspose_dense(model) == 8
    q_proj = model.layers[0].self_attn["q_proj"]
    assert isinstance(q_proj, DenseProjection)
    assert "Transpose" not in _graph(q_proj(x))
    assert "Transpose" in _graph(nn.Linear(64, 8)(x))  # what it spares: one per call
    assert _parameter_names(model) == names  # the views are no second copy
    for a, b in zip(before, _outputs(model, x), strict=True):
        np.testing.assert_array_equal(a, b)
