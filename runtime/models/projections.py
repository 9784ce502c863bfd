"""Projections of one input fused into one matmul: Q/K/V, and the MLP's gate and up.

On the GPU a decode step of 16 or more rows is bound by the host, not the device: MLX hands
every matmul of more than one row to cuBLAS, and in CUDA-graph mode each such call is captured
into a child graph, about 18 us of host time per matmul against about 5 us for an elementwise
kernel (``bench/gpu_ops.py``). A llama layer has seven matmuls; fusing the projections that
read the same input leaves four, one matmul for Q, K and V and one for gate and up, which
read the same weights in the same order, so the device time does not change.

``fuse_projections`` rewrites a loaded model in place, after its weights are loaded (the
checkpoint names stay those of the separate projections). ``pretranspose_dense`` then gives
every dense projection a transposed view of its weight made once: ``nn.Linear`` multiplies by
``weight.T``, a Transpose node built and evaluated on every call, and a decode step is made of
such nodes (``bench/profile_step.py``). The models call ``qkv`` and
``gate_up``, which work on either form, so a model that was never fused (mlx-lm parity tests,
the embedding path before an engine exists) runs unchanged.
"""

from __future__ import annotations

import os
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from runtime.models.quantized_linear import QuantizedLinear, on_cuda

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


class FusedLinear(nn.Module):
    """One ``Linear``/``QuantizedLinear`` whose output is the parts' outputs side by side."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.proj = _pretransposed(_concatenated(parts))
        sizes = [_output_dims(p) for p in parts]
        self._splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]

    def __call__(self, x: mx.array) -> list[mx.array]:
        # Slices along the last axis are views; what reads them next (reshape, RoPE, SwiGLU)
        # copies only where it must.
        return cast(list[mx.array], mx.split(self.proj(x), self._splits, axis=-1))


def qkv(attention: nn.Module, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """The query, key and value projections of ``x``, fused or not."""
    fused = attention.get("qkv_proj")
    if isinstance(fused, FusedLinear):  # (Phi-3's own ``qkv_proj`` is a plain checkpoint layer)
        q, k, v = fused(x)
        return q, k, v
    return attention["q_proj"](x), attention["k_proj"](x), attention["v_proj"](x)


def gate_up(mlp: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """The MLP's gate and up projections of ``x``, fused or not."""
    fused = mlp.get("gate_up_proj")
    if isinstance(fused, FusedLinear):
        gate, up = fused(x)
        return gate, up
    return mlp["gate_proj"](x), mlp["up_proj"](x)


def projections_fused() -> bool:
    """Whether engines fuse their model's projections: on CUDA, where it was measured to pay;
    ``MLXRUNNER_FUSED_PROJECTIONS=1`` or ``0`` decides elsewhere too (the CPU A/B was within
    the noise of a shared 2-core machine, so the CPU keeps the separate layers for now)."""
    choice = os.environ.get("MLXRUNNER_FUSED_PROJECTIONS", "auto")
    if choice in ("0", "1"):
        return choice == "1"
    return on_cuda()


class DenseProjection(nn.Linear):
    """``nn.Linear`` (same parameters) that multiplies by a transposed view of its weight made
    once, sharing the weight's memory. The view is taken when the layer is made: a weight
    replaced later (``update``, ``load_weights``) must come with a new layer."""

    def __init__(self, weight: mx.array, bias: mx.array | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None)
        self.weight = weight
        if bias is not None:
            self.bias = bias
        # A leading underscore keeps the view out of ``parameters()``: it is not a second copy.
        self._transposed = weight.T
        mx.eval(self._transposed)  # evaluated: a leaf that shares the weight's buffer

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self["bias"], x, self._transposed)
        return x @ self._transposed


def _pretransposed(layer: nn.Module) -> nn.Module:
    if type(layer) is not nn.Linear:  # quantized layers multiply transposed in one kernel
        return layer
    return DenseProjection(layer.weight, layer.get("bias"))


def pretranspose_dense(model: nn.Module) -> int:
    """Make every plain dense ``nn.Linear`` of ``model`` a ``DenseProjection``, in place;
    returns how many. Outputs are the same to the bit: the matmul sees the same strides."""
    count = 0
    for _, module in model.named_modules():
        for name, child in list(module.items()):
            layer = _pretransposed(child)
            if layer is not child:
                module[name] = layer
                count += 1
    return count


def fuse_projections(model: nn.Module) -> int:
    """Fuse every layer's Q/K/V and gate/up projections in place; returns how many were fused.

    A group is left alone when its parts differ in kind (a quantized next to a dense one,
    different bits or group sizes, bias on one only): the model then runs it unfused. Only
    a model whose layers call ``qkv`` and ``gate_up`` says so (``FUSABLE_PROJECTIONS``);
    another one is left as it is.
    """
    if not getattr(model, "FUSABLE_PROJECTIONS", False):
        return 0
    fused = 0
    for _, module in model.named_modules():
        for names, target in ((_QKV, "qkv_proj"), (_GATE_UP, "gate_up_proj")):
            if target in module or not all(name in module for name in names):
                continue
            parts = [module[name] for name in names]
            if not _compatible(parts):
                continue
            module[target] = FusedLinear(parts)
            for name in names:
                del module[name]
            # One group at a time: the separate weights are freed as soon as the fused copy
            # exists, so loading never holds two copies of the whole model.
            mx.eval(module[target].parameters())
            fused += 1
    return fused


def _kind(part: nn.Module) -> tuple[object, ...] | None:
    if isinstance(part, nn.QuantizedLinear):
        return ("q", part.group_size, part.bits, part.mode, "bias" in part, part.weight.dtype)
    if isinstance(part, nn.Linear):
        return ("d", "bias" in part, part.weight.dtype)
    return None


def _compatible(parts: list[nn.Module]) -> bool:
    kinds = {_kind(p) for p in parts}
    return len(kinds) == 1 and None not in kinds


def _output_dims(part: nn.Module) -> int:
    return int(part["weight"].shape[0])


def _concatenated(parts: list[nn.Module]) -> nn.Module:
    first = parts[0]
    out_dims = sum(_output_dims(p) for p in parts)
    has_bias = "bias" in first
    names = ["weight", *(["scales", "biases"] if isinstance(first, nn.QuantizedLinear) else [])]
    if has_bias:
        names.append("bias")
    if isinstance(first, nn.QuantizedLinear):
        in_dims = first.scales.shape[-1] * first.group_size
        joined: nn.Module = QuantizedLinear(
            in_dims,
            out_dims,
            bias=has_bias,
            group_size=first.group_size,
            bits=first.bits,
            mode=first.mode,
        )
    else:
        joined = nn.Linear(first.weight.shape[1], out_dims, bias=has_bias)
    for name in names:
        joined[name] = mx.concatenate([p[name] for p in parts], axis=0)
    if isinstance(first, nn.QuantizedLinear):
        joined.freeze()  # as nn.quantize leaves quantized layers
    return joined
