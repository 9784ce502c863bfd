"""Ollama's manifest JSON: parse and validate it, and write it back byte-for-byte stable.

A manifest (``manifests/<host>/<namespace>/<name>/<tag>``) is a Docker v2 image manifest: a
config blob plus layers, each ``{mediaType, digest, size[, name]}``. This module knows which
media types a text model uses (safetensors tensor and JSON layers as Ollama's MLX models have
them, or one GGUF layer as Ollama's registry models have it), which Ollama layers may be
present and ignored, and which mean "a model we cannot run"; everything else is rejected so a
store we misread never loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import attrs

from runtime.errors import ModelLoadError

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
GGUF_MEDIA_TYPE = "application/vnd.ollama.image.model"  # a whole GGUF file (Ollama's registry)

# Present in Ollama manifests, not needed to run the model (Ollama's MLX runner skips them too).
IGNORED_MEDIA_TYPES = frozenset(
    f"application/vnd.ollama.image.{kind}"
    for kind in ("template", "params", "license", "system", "messages")
)
# Known, but a different kind of model than the safetensors ones this store serves.
UNSUPPORTED_MEDIA_TYPES = {
    "application/vnd.ollama.image.projector": "a vision projector (not supported)",
    "application/vnd.ollama.image.adapter": "a LoRA adapter (not supported)",
}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@attrs.frozen(kw_only=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    name: str = ""  # Ollama's label: the file name of a JSON layer, a tensor path otherwise

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.name:
            out["name"] = self.name
        return out


@attrs.frozen(kw_only=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]
    digest: str = ""  # sha256 of the bytes it was parsed from (Ollama's model digest)

    def to_bytes(self) -> bytes:
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        return json.dumps(body, indent=2).encode("utf-8")

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}

    def tensor_layers(self) -> list[Layer]:
        """Tensor layers, deduplicated by digest (one blob may be listed twice)."""
        seen: set[str] = set()
        out = []
        for layer in self.layers:
            if layer.media_type == TENSOR_MEDIA_TYPE and layer.digest not in seen:
                seen.add(layer.digest)
                out.append(layer)
        return out

    def gguf_layer(self) -> Layer | None:
        """The GGUF file of a model pulled from Ollama's registry (``None`` for safetensors)."""
        return next((x for x in self.layers if x.media_type == GGUF_MEDIA_TYPE), None)

    def json_layer(self, file_name: str) -> Layer | None:
        for layer in self.layers:
            if layer.media_type == JSON_MEDIA_TYPE and layer.name == file_name:
                return layer
        return None

    def used_layers(self) -> list[Layer]:
        """The config blob and every layer a load reads (the ones whose digests are checked)."""
        return [self.config, *(x for x in self.layers if x.media_type not in IGNORED_MEDIA_TYPES)]


def _layer(where: str, raw: Any, index: str) -> Layer:
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: {index} is not a JSON object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    name = raw.get("name", "")
    if not isinstance(media_type, str):
        raise ModelLoadError(f"{where}: {index} has no mediaType")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ModelLoadError(f"{where}: {index} has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ModelLoadError(f"{where}: {index} has an invalid size {size!r}")
    if not isinstance(name, str):
        raise ModelLoadError(f"{where}: {index} has an invalid name {name!r}")
    return Layer(media_type=media_type, digest=digest, size=size, name=name)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Validate manifest bytes; ``where`` (model name and file) prefixes every error."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{where}: malformed manifest JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: malformed manifest: expected a JSON object")
    if raw.get("schemaVersion") != 2:
        raise ModelLoadError(
            f"{where}: unsupported manifest schemaVersion {raw.get('schemaVersion')!r}"
        )
    config = _layer(where, raw.get("config"), "config")
    if config.media_type != CONFIG_MEDIA_TYPE:
        raise ModelLoadError(f"{where}: unknown config media type {config.media_type!r}")
    layers_raw = raw.get("layers")
    if not isinstance(layers_raw, list):
        raise ModelLoadError(f"{where}: malformed manifest: 'layers' is not a list")
    layers = tuple(_layer(where, x, f"layer {i}") for i, x in enumerate(layers_raw))
    for layer in layers:
        kind = layer.media_type
        if kind in UNSUPPORTED_MEDIA_TYPES:
            raise ModelLoadError(
                f"{where}: layer {layer.digest} is {UNSUPPORTED_MEDIA_TYPES[kind]}"
            )
        known = (TENSOR_MEDIA_TYPE, JSON_MEDIA_TYPE, GGUF_MEDIA_TYPE)
        if kind not in known and kind not in IGNORED_MEDIA_TYPES:
            raise ModelLoadError(f"{where}: layer {layer.digest} has unknown media type {kind!r}")
        if kind == JSON_MEDIA_TYPE and not layer.name:
            raise ModelLoadError(f"{where}: JSON layer {layer.digest} has no file name")
    gguf = [layer for layer in layers if layer.media_type == GGUF_MEDIA_TYPE]
    if len(gguf) > 1:
        raise ModelLoadError(f"{where}: more than one GGUF model layer")
    if gguf and any(layer.media_type == TENSOR_MEDIA_TYPE for layer in layers):
        raise ModelLoadError(f"{where}: a GGUF model layer beside safetensors tensor layers")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return Manifest(config=config, layers=layers, digest=digest)
