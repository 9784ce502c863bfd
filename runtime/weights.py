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
from pathlib import Path
from typing import Any

import attrs

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
