"""Reading a stored model: each blob checked against its manifest layer, then the model's files.

``check_blob`` compares a blob's size and, with ``verify``, its sha256 with what the manifest
says, so a damaged store fails with an error naming the blob and the model instead of loading
wrong weights; a blob hashed at an earlier load whose file has not changed since is not hashed
again (``runtime.store.verified``). ``read_profile`` reads a manifest's profile layers
(``runtime.store.profile``), and ``model_files`` its JSON layers, tokenizer and tensor blobs
into ``ModelFiles``. ``runtime.store.layout.Store`` calls these with its ``blobs/`` folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from runtime.errors import ModelLoadError
from runtime.formats.model_files import ModelFiles
from runtime.store import verified
from runtime.store.manifest import Layer, Manifest
from runtime.store.profile import PROFILE_MEDIA_TYPES, ModelProfile, read_layers
from runtime.store.verified import VerifiedBlobs

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def blob_file(blobs: Path, digest: str) -> Path:
    """The blob of ``digest`` in the ``blobs/`` folder (``sha256-<hex>``)."""
    return blobs / digest.replace(":", "-")


def check_blob(
    blobs: Path,
    model: str,
    layer: Layer,
    *,
    verify: bool = True,
    known: VerifiedBlobs | None = None,
) -> Path:
    """The blob's path once its size (and, with ``verify``, its sha256) match the manifest.

    With ``known``, a blob hashed before and unchanged since is not hashed again.
    """
    path = blob_file(blobs, layer.digest)
    what = f"model {model!r}: blob {layer.digest}"
    label = f" ({layer.name})" if layer.name else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{what}{label} is missing ({path})") from None
    if st.st_size != layer.size:
        raise ModelLoadError(
            f"{what}{label} is {'truncated' if st.st_size < layer.size else 'corrupt'}: "
            f"{st.st_size} bytes, manifest says {layer.size}"
        )
    if verify and not (known is not None and known.known(layer.digest, st)):
        started = verified.now()
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ModelLoadError(f"{what}{label} cannot be read ({exc})") from exc
        if actual != layer.digest:
            raise ModelLoadError(f"{what}{label} is corrupt: its sha256 is {actual}")
        if known is not None:
            known.record(layer.digest, path, st, started)
    return path


def read_json(blobs: Path, model: str, layer: Layer, *, verify: bool = True) -> Any:
    """A JSON blob, checked as ``check_blob`` checks it."""
    path = check_blob(blobs, model, layer, verify=verify)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"model {model!r}: blob {layer.digest} ({layer.name or 'config'}) "
            f"is not valid JSON ({exc})"
        ) from exc


def read_profile(
    blobs: Path, model: str, manifest: Manifest, *, verify: bool, known: VerifiedBlobs | None
) -> ModelProfile:
    """The system prompt, template, parameters and messages of ``manifest``'s profile layers."""
    layers = {
        layer.media_type: check_blob(blobs, model, layer, verify=verify, known=known).read_bytes()
        for layer in manifest.layers
        if layer.media_type in PROFILE_MEDIA_TYPES
    }
    return read_layers(model, layers)


def model_files(
    blobs: Path, model: str, manifest: Manifest, manifest_path: Path, profile: ModelProfile
) -> ModelFiles:
    """The ``ModelFiles`` of a manifest whose used blobs were checked (``ModelLoadError`` when
    a layer it needs is absent or not what it should be)."""
    if not manifest.tensor_layers():
        raise ModelLoadError(f"model {model!r}: the manifest lists no tensor layers")

    def json_object(file_name: str, *, required: bool) -> dict[str, Any] | None:
        layer = manifest.json_layer(file_name)
        data = None if layer is None else read_json(blobs, model, layer, verify=False)
        if data is None and required:
            raise ModelLoadError(f"model {model!r}: the manifest has no {file_name} layer")
        if data is not None and not isinstance(data, dict):
            raise ModelLoadError(f"model {model!r}: {file_name} is not a JSON object")
        return data

    config = json_object("config.json", required=True)
    assert config is not None
    tok_layer = manifest.json_layer("tokenizer.json")
    if tok_layer is None:
        raise ModelLoadError(f"model {model!r}: the manifest has no tokenizer.json layer")
    try:
        tokenizer_json = blob_file(blobs, tok_layer.digest).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"model {model!r}: tokenizer.json is not UTF-8") from exc
    tensors = manifest.tensor_layers()
    tokenizer_config = json_object("tokenizer_config.json", required=False) or {}
    if profile.template is not None:
        tokenizer_config = {**tokenizer_config, "chat_template": profile.template}
    return ModelFiles(
        name=model,
        config=config,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        generation_config=json_object("generation_config.json", required=False),
        weight_files=tuple(blob_file(blobs, layer.digest) for layer in tensors),
        digest=manifest.digest,
        size_bytes=sum(layer.size for layer in tensors),
        modified_at=manifest_path.stat().st_mtime,
        profile=profile,
    )
