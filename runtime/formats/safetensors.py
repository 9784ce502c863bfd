"""Safetensors files: header checks and the three-phase tensor read.

``check_safetensors`` validates a file's header against its size (MLX reads tensor data
lazily, so a truncated file would otherwise fail only at first use). ``read_tensors`` turns a
model's safetensors files into one name -> array map in mlx-lm naming; the arrays stay lazy,
so nothing but headers is read until they are evaluated:

1. raw: every file is read (``mx.load``), every tensor kept under its own name;
2. scales: Ollama's ``<path>.weight.scale`` becomes ``<path>.scales``;
3. biases: Ollama's ``<path>.weight.bias`` becomes ``<path>.biases`` (the affine quantization
   bias) only where a scale exists for that weight; real layer biases (``<path>.bias``) stay.

The quantization each file's ``__metadata__`` declares (``quant_type``, ``group_size``,
per-tensor overrides) comes along; ``runtime.models.checkpoint`` checks it against the shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from runtime.errors import ModelLoadError

_SCALE = ".weight.scale"
_QBIAS = ".weight.bias"
_QUANT_TYPES = {"int4": 4, "q4": 4, "fp4": 4, "int8": 8, "q8": 8, "fp8": 8}
_ITEM_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}
_ITEM_SIZES |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@attrs.frozen(kw_only=True)
class TensorSet:
    """Tensors in mlx-lm naming, where each came from, and declared quantization per weight."""

    tensors: dict[str, mx.array]
    origins: dict[str, str]  # tensor name -> file it was read from
    quant: dict[str, tuple[int, int]]  # module path -> (bits, group_size) from file metadata


def check_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's header against its size; return (tensor header, metadata).

    MLX reads tensor data lazily, so a truncated file would otherwise fail only at first use.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n > 100 * 1024 * 1024 or 8 + n > size:
                raise ModelLoadError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (__metadata__)")
    data_size = size - 8 - n
    for name, info in header.items():
        end = _data_end(path, name, info)
        if end > data_size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end}, "
                f"the file holds {data_size}"
            )
    return header, {str(k): str(v) for k, v in metadata.items()}


def _data_end(path: Path, name: str, info: Any) -> int:
    """Where a tensor's data ends, its offsets checked against its shape and dtype (as the
    safetensors library does, where the dtype is one it knows)."""
    try:
        start, end = info["data_offsets"]
        shape = info["shape"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: tensor {name!r} has no valid data_offsets") from exc
    numbers = [start, end, *shape] if isinstance(shape, list) else []
    if not numbers or not all(type(x) is int and x >= 0 for x in numbers) or start > end:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has invalid data_offsets {info['data_offsets']!r} or "
            f"shape {shape!r}"
        )
    item = _ITEM_SIZES.get(str(info.get("dtype")))
    if item is not None and end - start != math.prod(shape) * item:
        raise ModelLoadError(
            f"{path}: tensor {name!r} ({info.get('dtype')}, shape {shape}) needs "
            f"{math.prod(shape) * item} bytes, its data_offsets hold {end - start}"
        )
    return end


def _declared_quant(metadata: dict[str, str], weight: str, origin: str) -> tuple[int, int] | None:
    kind = metadata.get(f"{weight}.quant_type", metadata.get("quant_type", "")).lower()
    if not kind:
        return None
    bits = _QUANT_TYPES.get(kind)
    if bits is None:
        raise ModelLoadError(f"{origin}: unsupported quant_type {kind!r} for tensor {weight!r}")
    group_text = metadata.get(f"{weight}.group_size", metadata.get("group_size", "64"))
    if not group_text.isdigit():
        raise ModelLoadError(f"{origin}: invalid group_size {group_text!r} for tensor {weight!r}")
    return bits, int(group_text)


def read_tensors(
    files: Sequence[Path], *, on_file: Callable[[Path, int, int, int], None] | None = None
) -> TensorSet:
    """Read safetensors files in three phases (raw, scales, bias remap); see the module doc.

    ``on_file(path, bytes, tensors, total tensors)`` is called after each file is read.
    """
    raw: dict[str, mx.array] = {}
    origins: dict[str, str] = {}
    metas: dict[str, dict[str, str]] = {}
    # Every header is checked before any data is read (and gives the total for progress).
    headers = [check_safetensors(path) for path in files]
    total_tensors = sum(len(header) for header, _ in headers)
    # Phase 1: raw tensors, every file, names as stored.
    for path, (_, metadata) in zip(files, headers, strict=True):
        try:
            arrays = mx.load(str(path), format="safetensors")  # store blobs have no extension
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"{path}: cannot load safetensors ({exc})") from exc
        assert isinstance(arrays, dict)
        for name, array in arrays.items():
            raw[name] = array
            origins[name] = str(path)
            metas[name] = metadata
        if on_file is not None:
            on_file(path, path.stat().st_size, len(arrays), total_tensors)
    # Phase 2: scales.
    out: dict[str, mx.array] = {}
    out_origins: dict[str, str] = {}
    quant: dict[str, tuple[int, int]] = {}
    scaled: set[str] = set()
    for name, array in raw.items():
        if name.endswith(_SCALE):
            module = name[: -len(_SCALE)]
            scaled.add(module)
            out[module + ".scales"] = array
            out_origins[module + ".scales"] = origins[name]
            declared = _declared_quant(metas[name], module + ".weight", origins[name])
            if declared is not None:
                quant[module] = declared
    # Phase 3: everything else; a ".weight.bias" is a quantization bias only beside a scale.
    for name, array in raw.items():
        if name.endswith(_SCALE):
            continue
        target = name
        if name.endswith(_QBIAS) and name[: -len(_QBIAS)] in scaled:
            target = name[: -len(_QBIAS)] + ".biases"
        out[target] = array
        out_origins[target] = origins[name]
    return TensorSet(tensors=out, origins=out_origins, quant=quant)
