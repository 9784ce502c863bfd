"""What an import reads: a model folder or a GGUF file, as one checked ``Source``.

Both kinds end up in mlx-lm naming (``.weight``/``.scales``/``.biases`` for quantized modules)
with the quantization of each module, so the importer has one thing to transform and write.
The tensors are checked against the architecture here (names and shapes), so a broken source
fails the import with the tensor named, rather than leaving a stored model that cannot load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.safetensors import ModelFiles, folder_files, read_tensors
from runtime.models import architecture
from runtime.models.loader import flat_parameters
from runtime.store.layout import Store

# Keys that describe the source's encoding, not the model: the stored blobs say it instead.
_ENCODING_KEYS = ("quantization", "quantization_config")


@attrs.frozen(kw_only=True)
class Source:
    config: dict[str, Any]  # config.json without quantization keys
    weights: dict[str, mx.array]  # mlx-lm names, sanitized (no tied lm_head, no inv_freq)
    quant: dict[str, tuple[int, int]]  # module -> (bits, group_size)
    tokenizer_json: str
    tokenizer_config: dict[str, Any]  # includes "chat_template" when the source has one
    generation_config: dict[str, Any] | None


def _infer(weight: mx.array, scales: mx.array, in_dims: int) -> tuple[int, int]:
    return weight.shape[-1] * 32 // in_dims, in_dims // max(1, scales.shape[-1])


def _config_quant(config: dict[str, Any], module: str) -> tuple[int, int] | None:
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


def check_weights(
    where: str,
    config: dict[str, Any],
    weights: dict[str, mx.array],
    declared: dict[str, tuple[int, int]],
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int]]]:
    """Sanitize ``weights`` and check them against the architecture; return them with quant."""
    module = architecture(config)
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{where}: invalid config.json ({exc})") from exc
    weights = model.sanitize(dict(weights))
    expected = {k: tuple(v.shape) for k, v in flat_parameters(model).items()}
    quant: dict[str, tuple[int, int]] = {}
    for key in sorted(k for k in weights if k.endswith(".scales")):
        path = key[: -len(".scales")]
        w_key = f"{path}.weight"
        if w_key not in expected or w_key not in weights:
            raise ModelLoadError(f"{where}: scales {key!r} without a known weight {w_key!r}")
        in_dims = expected[w_key][-1]
        inferred = _infer(weights[w_key], weights[key], in_dims)
        bits_group = declared.get(path) or inferred
        if bits_group != inferred or f"{path}.biases" not in weights:
            raise ModelLoadError(
                f"{where}: tensor {w_key!r} shape {tuple(weights[w_key].shape)} does not match "
                f"quantization {bits_group} (or its biases are missing)"
            )
        quant[path] = bits_group
    for key, array in weights.items():
        path, _, part = key.rpartition(".")
        if path in quant and part in ("scales", "biases"):
            continue
        if key not in expected:
            raise ModelLoadError(f"{where}: unexpected tensor {key!r}")
        shape = tuple(array.shape)
        if path in quant and part == "weight":
            shape = (*shape[:-1], shape[-1] * 32 // quant[path][0])
        if shape != expected[key]:
            raise ModelLoadError(
                f"{where}: tensor {key!r} has shape {shape}, expected {expected[key]}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    return weights, quant


def _from_files(files: ModelFiles, folder: Path | None) -> Source:
    where = str(folder) if folder is not None else f"model {files.name!r}"
    tensors = read_tensors(files.weight_files)
    declared = dict(tensors.quant)
    for key in tensors.tensors:
        if key.endswith(".scales"):
            path = key[: -len(".scales")]
            found = _config_quant(files.config, path)
            if path not in declared and found is not None:
                declared[path] = found
    config = {k: v for k, v in files.config.items() if k not in _ENCODING_KEYS}
    weights, quant = check_weights(where, files.config, tensors.tensors, declared)
    tok_config = dict(files.tokenizer_config)
    if "chat_template" not in tok_config and folder is not None:
        # Newer HF folders keep the template beside tokenizer_config.json.
        jinja = folder / "chat_template.jinja"
        legacy = folder / "chat_template.json"
        if jinja.is_file():
            tok_config["chat_template"] = jinja.read_text(encoding="utf-8")
        elif legacy.is_file():
            try:
                tok_config["chat_template"] = json.loads(legacy.read_text("utf-8"))["chat_template"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{legacy}: no chat_template in it ({exc})") from exc
    return Source(
        config=config,
        weights=weights,
        quant=quant,
        tokenizer_json=files.tokenizer_json,
        tokenizer_config=tok_config,
        generation_config=files.generation_config,
    )


def _gguf(path: Path) -> Source:
    from runtime.formats.gguf import read_gguf

    contents = read_gguf(path)
    declared = {}
    for key in contents.weights:
        if key.endswith(".scales"):
            found = _config_quant(contents.config, key[: -len(".scales")])
            if found is not None:
                declared[key[: -len(".scales")]] = found
    weights, quant = check_weights(str(path), contents.config, contents.weights, declared)
    config = {k: v for k, v in contents.config.items() if k not in _ENCODING_KEYS}
    return Source(
        config=config,
        weights=weights,
        quant=quant,
        tokenizer_json=contents.tokenizer_json,
        tokenizer_config=dict(contents.tokenizer_config),
        generation_config=None,
    )


def read_source(path: Path, store: Store | None = None) -> Source:
    """A model folder, a ``.gguf`` file, or a model already in ``store`` (to re-quantize it)."""
    if path.is_dir():
        return _from_files(folder_files(path), path)
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return _gguf(path)
        raise ModelLoadError(f"{path}: not a model folder or a GGUF file")
    if store is not None:
        try:
            return _from_files(store.resolve(str(path)), None)
        except ModelNotFoundError:
            pass
    raise ModelNotFoundError(f"{path}: no such file or folder, nor a model in the store")
