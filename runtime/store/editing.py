"""New models from stored ones, without touching tensors: copy a model under another name, or
derive one with another system prompt, chat template, parameters or messages.

Both follow Ollama (``/api/copy``, ``/api/create`` with ``from``): a copy is the source's
manifest byte for byte under the new name (same digest, blobs shared); a derived model keeps
every layer of its base and replaces the profile layers it is given
(``runtime.store.profile``): a new ``system``, ``template`` or non-empty ``messages`` replaces
the base's, ``parameters`` are merged over the base's (the new value wins per option). Its
config blob lists the new layers in ``rootfs.diff_ids``, as Ollama's does. A name that already
exists is replaced, and the blobs only the replaced manifest used are removed. Nothing here
imports MLX: both are file operations, fast enough for a worker thread of the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from runtime.errors import ModelLoadError
from runtime.store.layout import Store
from runtime.store.manifest import CONFIG_MEDIA_TYPE, Layer, Manifest, parse_manifest
from runtime.store.names import ModelName
from runtime.store.profile import (
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    layer_bytes,
)

Report = Callable[[str], None]


@attrs.frozen(kw_only=True)
class ProfileChanges:
    """What ``/api/create`` asks to change; ``None`` (or empty) keeps the base's."""

    system: str | None = None
    template: str | None = None  # checked already (``profile.check_template``)
    parameters: Mapping[str, Any] | None = None  # checked already (as request options)
    messages: tuple[Mapping[str, str], ...] | None = None  # ``profile.check_messages``'s
    licenses: tuple[str, ...] = ()  # one layer each, replacing the base's

    def is_empty(self) -> bool:
        return not (
            self.system or self.template or self.parameters or self.messages or self.licenses
        )


def _previous_digests(store: Store, name: ModelName) -> set[str]:
    try:
        return store.read_manifest(name)[1].digests()
    except ModelLoadError:  # not there (ModelNotFoundError is one), or damaged
        return set()


def copy_model(store: Store, source: str, destination: str) -> ModelName:
    """Copy ``source``'s manifest to ``destination``; ``ModelNotFoundError`` if it is absent."""
    src, _, path = store.read_manifest(source)
    dst = ModelName.parse(destination)
    if dst == src:
        return dst
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # removed since it was read
        store.read_manifest(src)
        raise
    manifest = parse_manifest(data, f"model {src.short!r} ({path})")
    previous = _previous_digests(store, dst)
    store.commit_manifest(dst, manifest, raw=data)
    store.prune(previous - manifest.digests())
    return dst


def _json_blob(store: Store, model: str, layer: Layer, what: str) -> Any:
    path = store.check_blob(model, layer)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model {model!r}: its {what} blob: {exc}") from None


def _merged_parameters(
    store: Store, model: str, layers: list[Layer], new: Mapping[str, Any]
) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer.media_type == PARAMS_MEDIA_TYPE:
            old = _json_blob(store, model, layer, "params")
            if isinstance(old, dict):
                merged.update(old)
    merged.update(new)
    return merged


def derive_model(
    store: Store, name: str, base: str, changes: ProfileChanges, report: Report
) -> str:
    """Write ``name`` as ``base`` with ``changes``; return the new manifest's digest.

    ``report`` gets Ollama's status lines ("using existing layer sha256:...", "creating new
    layer sha256:...", "writing manifest", "success").
    """
    parsed = ModelName.parse(name)
    base_name, manifest, _ = store.read_manifest(base)
    model = base_name.short
    layers = list(manifest.layers)
    for layer in layers:
        report(f"using existing layer {layer.digest}")

    wanted: list[tuple[str, Any]] = []
    if changes.template:
        wanted.append((TEMPLATE_MEDIA_TYPE, changes.template))
    if changes.system:
        wanted.append((SYSTEM_MEDIA_TYPE, changes.system))
    if changes.parameters:
        merged = _merged_parameters(store, model, layers, changes.parameters)
        wanted.append((PARAMS_MEDIA_TYPE, merged))
    if changes.messages:
        wanted.append((MESSAGES_MEDIA_TYPE, changes.messages))

    if changes.licenses:
        layers = [x for x in layers if x.media_type != LICENSE_MEDIA_TYPE]
        wanted += [(LICENSE_MEDIA_TYPE, text) for text in changes.licenses]

    added: set[str] = set()
    try:
        for media_type, value in wanted:
            if media_type != LICENSE_MEDIA_TYPE:  # a model may have several licenses
                layers = [x for x in layers if x.media_type != media_type]
            blob, reused = store.add_bytes(layer_bytes(media_type, value))
            if not reused:
                added.add(blob.digest)
            layers.append(attrs.evolve(blob, media_type=media_type))
            report(f"creating new layer {blob.digest}")
        config = _json_blob(store, model, manifest.config, "config")
        if not isinstance(config, dict):
            raise ModelLoadError(f"model {model!r}: its config blob is not a JSON object")
        config["rootfs"] = {"type": "layers", "diff_ids": [x.digest for x in layers]}
        blob, reused = store.add_bytes(json.dumps(config, indent=2).encode("utf-8"))
        if not reused:
            added.add(blob.digest)
        derived = Manifest(
            config=attrs.evolve(blob, media_type=CONFIG_MEDIA_TYPE), layers=tuple(layers)
        )
        previous = _previous_digests(store, parsed)
        report("writing manifest")
        store.commit_manifest(parsed, derived)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            store.prune(added)
        raise
    store.prune(previous - derived.digests())
    report("success")
    return "sha256:" + hashlib.sha256(derived.to_bytes()).hexdigest()
