"""Model sources and the three-phase tensor load.

``ModelFiles`` describes a model however it was found (an HF/MLX folder, a store manifest);
``read_tensors`` turns its safetensors files into one name -> array map in mlx-lm naming:

1. raw: every file is read (``mx.load``), every tensor kept under its own name;
2. scales: Ollama's ``<path>.weight.scale`` becomes ``<path>.scales``;
3. biases: Ollama's ``<path>.weight.bias`` becomes ``<path>.biases`` (the affine quantization
   bias) only where a scale exists for that weight; real layer biases (``<path>.bias``) stay.

Quantization parameters come from the safetensors ``__metadata__`` (``quant_type``,
``group_size``, per-tensor overrides) when present, else from ``config["quantization"]``, else
from the tensor shapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from runtime.errors import ModelLoadError, ModelNotFoundError


@attrs.frozen(kw_only=True)
class ModelFiles:
    """Everything needed to build a model, wherever it came from."""

    name: str
    config: dict[str, Any]
    tokenizer_json: str  # the text of tokenizer.json
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any] | None
    weight_files: tuple[Path, ...]  # safetensors files (verified already, for a store)
    digest: str = ""  # the manifest digest for a store model
    size_bytes: int = 0
    modified_at: float = 0.0


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path}: missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def folder_files(folder: Path) -> ModelFiles:
    """Describe an HF/MLX model folder (``config.json``, ``*.safetensors``, tokenizer files)."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder")
    config = _read_json(folder / "config.json", required=True)
    assert config is not None
    tok_path = folder / "tokenizer.json"
    if not tok_path.exists():
        raise ModelLoadError(f"{tok_path}: missing")
    index = _read_json(folder / "model.safetensors.index.json", required=False)
    if index is not None:
        names = sorted(set(index.get("weight_map", {}).values()))
        files = tuple(folder / n for n in names)
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: listed in model.safetensors.index.json but missing")
    else:
        files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    return ModelFiles(
        name=str(folder),
        config=config,
        tokenizer_json=tok_path.read_text(encoding="utf-8"),
        tokenizer_config=_read_json(folder / "tokenizer_config.json", required=False) or {},
        generation_config=_read_json(folder / "generation_config.json", required=False),
        weight_files=files,
        size_bytes=sum(f.stat().st_size for f in files),
        modified_at=max(f.stat().st_mtime for f in files),
    )


# ---- the three-phase tensor read ----

_SCALE = ".weight.scale"
_QBIAS = ".weight.bias"
_QUANT_TYPES = {"int4": 4, "q4": 4, "fp4": 4, "int8": 8, "q8": 8, "fp8": 8}


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
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} has no valid data_offsets") from exc
        if not 0 <= start <= end <= data_size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end}, "
                f"the file holds {data_size}"
            )
    return header, {str(k): str(v) for k, v in metadata.items()}


def _declared_quant(metadata: dict[str, str], weight: str) -> tuple[int, int] | None:
    kind = metadata.get(f"{weight}.quant_type", metadata.get("quant_type", "")).lower()
    if not kind:
        return None
    bits = _QUANT_TYPES.get(kind)
    if bits is None:
        raise ModelLoadError(f"unsupported quant_type {kind!r} for tensor {weight!r}")
    group = int(metadata.get(f"{weight}.group_size", metadata.get("group_size", "64")))
    return bits, group


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
            declared = _declared_quant(metas[name], module + ".weight")
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
