"""What a model holds besides its tensors: config, tokenizer files, chat template, generation
defaults, and where its safetensors files are.

``ModelFiles`` describes a model however it was found: ``folder_files`` reads an HF/MLX folder,
``runtime.store.layout.Store.resolve`` a stored model. A folder is read the way transformers
reads it: a ``chat_template.jinja`` beside ``tokenizer_config.json`` takes priority over the
config's ``chat_template`` (recent transformers versions write the template only there), and
the legacy ``chat_template.json`` fills in when neither has one. ``generation_config.json``
is kept whole: its ``eos_token_id`` list decides where generation stops (``runtime.text.tokenizer``)
and ``sampling_defaults`` reads the sampling values it declares.

No MLX here: the store resolves and lists models without importing it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.store.profile import ModelProfile

# generation_config.json's sampling keys (transformers' names) -> Ollama's option names.
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repeat_penalty",
}
_INT_OPTIONS = frozenset({"top_k"})

# config.json key naming how embeddings pool the final hidden states
# (``runtime.engine.embedding``): folded into the config from a sentence-transformers folder's
# Pooling module or a GGUF's ``pooling_type``, so the store keeps it with the config.
POOLING_KEY = "embedding_pooling"
POOLINGS = ("mean", "cls", "last", "max")
# sentence-transformers' Pooling config flags -> ours (one flag set: the others concatenate).
_ST_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
}


@attrs.frozen(kw_only=True)
class ModelFiles:
    """Everything besides tensor data that is needed to build a model, wherever it came from."""

    name: str
    config: dict[str, Any]  # config.json as the source wrote it
    tokenizer_json: str  # the text of tokenizer.json
    tokenizer_config: dict[str, Any]  # with "chat_template" when the model has one
    generation_config: dict[str, Any] | None
    weight_files: tuple[Path, ...]  # safetensors (store blobs verified) or the GGUF file
    digest: str = ""  # the manifest digest for a store model
    size_bytes: int = 0
    modified_at: float = 0.0
    # A stored model's system prompt, parameters and messages (its template, when it has one,
    # is already tokenizer_config's chat_template).
    profile: ModelProfile = attrs.field(factory=ModelProfile)

    @property
    def sampling_defaults(self) -> dict[str, float | int]:
        """The sampling options ``generation_config.json`` sets, under Ollama's names.

        Only values the file states are taken (``do_sample`` is not read: a file that lists
        just token ids would otherwise turn every request greedy). They are defaults for
        requests that leave an option out; the request's own values win.
        """
        out: dict[str, float | int] = {}
        for key, option in _SAMPLING_KEYS.items():
            value = (self.generation_config or {}).get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            if option in _INT_OPTIONS:
                if float(value).is_integer():
                    out[option] = int(value)
            else:
                out[option] = float(value)
        return out


def read_json_object(path: Path, *, required: bool) -> dict[str, Any] | None:
    """A JSON object file; ``None`` when it is absent and not ``required``."""
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


def _folder_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> Any:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja}: cannot read ({exc})") from exc
    if "chat_template" in tokenizer_config:
        return tokenizer_config["chat_template"]
    legacy = read_json_object(folder / "chat_template.json", required=False)
    if legacy is None:
        return None
    if "chat_template" not in legacy:
        raise ModelLoadError(f"{folder / 'chat_template.json'}: no chat_template in it")
    return legacy["chat_template"]


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index = read_json_object(folder / "model.safetensors.index.json", required=False)
    if index is None:
        files = tuple(sorted(folder.glob("*.safetensors")))
    else:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{folder / 'model.safetensors.index.json'}: no weight_map")
        files = tuple(folder / str(n) for n in sorted(set(weight_map.values())))
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: listed in model.safetensors.index.json but missing")
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    return files


def _sentence_transformers_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder declares (``modules.json`` names its Pooling
    module's folder, ``1_Pooling`` by convention), or None."""
    where = "1_Pooling"
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            listed = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{modules}: not valid JSON ({exc})") from exc
        for module in listed if isinstance(listed, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
                where = str(module.get("path", where))
    config = read_json_object(folder / where / "config.json", required=False)
    if not config:
        return None
    chosen = [mode for flag, mode in _ST_POOLING.items() if config.get(flag) is True]
    return chosen[0] if len(chosen) == 1 else None


def folder_files(folder: Path) -> ModelFiles:
    """Describe an HF/MLX model folder (``config.json``, ``*.safetensors``, tokenizer files)."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder")
    config = read_json_object(folder / "config.json", required=True)
    assert config is not None
    pooling = _sentence_transformers_pooling(folder)
    if pooling is not None:
        config = {**config, POOLING_KEY: pooling}
    tok_path = folder / "tokenizer.json"
    if not tok_path.exists():
        raise ModelLoadError(f"{tok_path}: missing")
    tokenizer_config = read_json_object(folder / "tokenizer_config.json", required=False) or {}
    template = _folder_template(folder, tokenizer_config)
    if template is not None:
        tokenizer_config = {**tokenizer_config, "chat_template": template}
    files = _weight_files(folder)
    return ModelFiles(
        name=str(folder),
        config=config,
        tokenizer_json=tok_path.read_text(encoding="utf-8"),
        tokenizer_config=tokenizer_config,
        generation_config=read_json_object(folder / "generation_config.json", required=False),
        weight_files=files,
        size_bytes=sum(f.stat().st_size for f in files),
        modified_at=max(f.stat().st_mtime for f in files),
    )
