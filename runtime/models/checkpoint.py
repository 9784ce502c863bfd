"""A model's tensors checked against its architecture, and what they say about the model.

``check_weights`` is the one check every source goes through, whatever comes next (a load, an
import, ``show``): the tensors are sanitized the way the architecture wants them (no rotary
tables, no tied ``lm_head``), each quantized module gets its (bits, group size) as the file's
metadata declares it, else as ``config.json``'s ``quantization`` says, else as its shapes imply,
and every name and shape is checked, so a broken source fails with the tensor and its file
named. ``count_parameters`` and ``quantization_label`` are the one way the parameter count and
the quantization that ``import``, ``show``, ``list`` and a loaded model report are computed.

Checking needs shapes only: an instance of the architecture gives the expected ones without
materializing its weights (MLX is lazy), and safetensors tensors are not read either.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from runtime.errors import ModelLoadError
from runtime.formats.model_files import ModelFiles
from runtime.formats.safetensors import TensorSet
from runtime.models import architecture

# config.json keys that describe how the source encodes its tensors, not the model: the
# tensors (and a stored blob's metadata) say it instead.
ENCODING_KEYS = ("quantization", "quantization_config")
# Bit widths MLX's affine quantization supports.
_BITS = (2, 3, 4, 5, 6, 8)
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@attrs.frozen(kw_only=True)
class Checkpoint:
    """A model source, resolved and checked: ready to be built, imported or described."""

    files: ModelFiles
    config: dict[str, Any]  # config.json without ``ENCODING_KEYS``
    weights: dict[str, mx.array]  # mlx-lm names, sanitized; safetensors data not read yet
    quant: dict[str, tuple[int, int]]  # quantized module -> (bits, group size)
    origins: dict[str, str]  # tensor name -> the file it comes from, for error messages

    @property
    def parameters(self) -> int:
        return count_parameters(self.weights, self.quant)

    @property
    def quantization(self) -> str:
        return quantization_label(self.weights, self.quant)


def flat_parameters(model: nn.Module) -> dict[str, mx.array]:
    """``{dotted name: array}`` of a module's parameters (checkpoint names)."""
    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))


def instantiate(config: dict[str, Any], where: str) -> nn.Module:
    """An instance of ``config``'s architecture, its weights not materialized."""
    module = architecture(config)
    try:
        return cast("nn.Module", module.Model(module.ModelArgs.from_dict(config)))
    except (TypeError, ValueError, LookupError, ArithmeticError) as exc:  # 0 heads, 2**40 dims
        raise ModelLoadError(f"{where}: invalid config.json ({exc})") from exc


def _config_quant(config: dict[str, Any], module: str) -> tuple[int, int] | None:
    """(bits, group) that config.json declares for ``module`` (mlx-lm's and HF's layouts)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    entry = q.get(module, q)
    if not isinstance(entry, dict) or "bits" not in entry:
        entry = q
    try:
        return int(entry["bits"]), int(entry["group_size"])
    except (KeyError, TypeError, ValueError):
        return None


def _implied_quant(weight: mx.array, scales: mx.array, in_dims: int) -> tuple[int, int] | None:
    """(bits, group) that the packed weight's and the scales' shapes imply, if they are whole."""
    packed, groups = weight.shape[-1] * 32, scales.shape[-1]
    if weight.dtype != mx.uint32 or packed % in_dims or not groups or in_dims % groups:
        return None
    return packed // in_dims, in_dims // groups


def check_weights(
    where: str, config: dict[str, Any], tensors: TensorSet
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int]]]:
    """Sanitize ``tensors`` and check them against the architecture; return them with quant.

    Errors name the file a tensor came from (``tensors.origins``), else ``where``.
    """
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and layers > len(tensors.tensors):  # it sizes the model's build
        raise ModelLoadError(
            f"{where}: config.json has num_hidden_layers = {layers} but the model has only "
            f"{len(tensors.tensors)} tensors"
        )
    model = instantiate(config, where)
    weights = model.sanitize(dict(tensors.tensors))
    expected = {k: tuple(v.shape) for k, v in flat_parameters(model).items()}

    def origin(key: str) -> str:
        return tensors.origins.get(key, where)

    quant: dict[str, tuple[int, int]] = {}
    for key in sorted(k for k in weights if k.endswith(".scales")):
        path = key[: -len(".scales")]
        w_key, b_key = f"{path}.weight", f"{path}.biases"
        if w_key not in expected:
            raise ModelLoadError(f"{origin(key)}: unexpected tensor {key!r}")
        for needed in (w_key, b_key):
            if needed not in weights:
                raise ModelLoadError(f"{origin(key)}: tensor {needed!r} missing beside {key!r}")
        in_dims = expected[w_key][-1]
        implied = _implied_quant(weights[w_key], weights[key], in_dims)
        declared = tensors.quant.get(path) or _config_quant(config, path) or implied
        if declared is None or declared != implied or declared[0] not in _BITS:
            raise ModelLoadError(
                f"{origin(w_key)}: tensor {w_key!r} shape {tuple(weights[w_key].shape)} "
                f"({weights[w_key].dtype}) does not match its quantization {declared} for "
                f"input size {in_dims}"
            )
        quant[path] = declared
    for key, array in weights.items():
        path, _, part = key.rpartition(".")
        shape = tuple(array.shape)
        if path in quant and part in ("scales", "biases"):
            weight_shape = expected[f"{path}.weight"]
            want = (*weight_shape[:-1], weight_shape[-1] // quant[path][1])
        elif key not in expected:
            raise ModelLoadError(f"{origin(key)}: unexpected tensor {key!r}")
        else:
            want = expected[key]
            if path in quant and part == "weight":
                shape = (*shape[:-1], shape[-1] * 32 // quant[path][0])
        if shape != want:
            raise ModelLoadError(
                f"{origin(key)}: tensor {key!r} has shape {tuple(array.shape)}, expected {want}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    return weights, quant


def check_checkpoint(files: ModelFiles, tensors: TensorSet, *, where: str) -> Checkpoint:
    """``files`` and their ``tensors`` as a checked ``Checkpoint`` (``check_weights``)."""
    weights, quant = check_weights(where, files.config, tensors)
    return Checkpoint(
        files=files,
        config={k: v for k, v in files.config.items() if k not in ENCODING_KEYS},
        weights=weights,
        quant=quant,
        origins=tensors.origins,
    )


def dtype_name(dtype: mx.Dtype) -> str:
    """Safetensors' spelling of an MLX dtype: ``F32``, ``F16``, ``BF16``, ``U32``..."""
    name = str(dtype).rpartition(".")[2]
    return _DTYPE_NAMES.get(name, name.upper())


def count_parameters(weights: dict[str, mx.array], quant: dict[str, tuple[int, int]]) -> int:
    """Parameters as the model sees them: a packed weight counts its unpacked values, and the
    quantization's own scales and biases do not count."""
    total = 0
    for name, array in weights.items():
        module, _, part = name.rpartition(".")
        if module in quant and part in ("scales", "biases"):
            continue
        if module in quant and part == "weight":
            total += array.size * 32 // quant[module][0]
        else:
            total += array.size
    return total


def quantization_label(weights: dict[str, mx.array], quant: dict[str, tuple[int, int]]) -> str:
    """``int4 g64`` for the (bits, group size) most quantized modules use; else the commonest
    float dtype (``F32``, ``BF16``...). Ties go to the smaller value, so any reading order of
    the same tensors gives the same label."""
    if quant:
        modules = Counter(quant.values())
        bits, group = max(sorted(modules), key=modules.__getitem__)
        return f"int{bits} g{group}"
    dtypes = Counter(
        dtype_name(a.dtype) for a in weights.values() if mx.issubdtype(a.dtype, mx.floating)
    )
    return max(sorted(dtypes), key=dtypes.__getitem__) if dtypes else "F32"
