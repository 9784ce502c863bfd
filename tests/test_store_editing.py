"""Copying a stored model and deriving one with a profile (``runtime.store.editing``), and
reading the profile back as a load does (``Store.resolve``, ``runtime.store.profile``)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from runtime.errors import ModelNotFoundError
from runtime.store.editing import ProfileChanges, copy_model, derive_model
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.store.manifest import parse_manifest
from runtime.store.profile import (
    MESSAGES_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    ModelProfile,
    ProfileError,
    check_messages,
    check_template,
    is_go_template,
)

JINJA = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
GO = "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}"


def _statuses(store: Store, name: str, base: str, changes: ProfileChanges) -> list[str]:
    out: list[str] = []
    derive_model(store, name, base, changes, out.append)
    return out


def test_copy_keeps_the_manifest_bytes_and_shares_the_blobs(store: Store) -> None:
    copy_model(store, "base", "me/other:v1")
    src = store.manifest_path(store.read_manifest("base")[0]).read_bytes()
    dst = store.manifest_path(store.read_manifest("me/other:v1")[0]).read_bytes()
    assert src == dst
    blobs = sorted(store.blobs.iterdir())
    store.remove("base")
    assert sorted(store.blobs.iterdir()) == blobs  # the copy still uses every blob
    assert store.resolve("me/other:v1").weight_files


def test_copy_of_a_missing_model_is_not_found(store: Store) -> None:
    with pytest.raises(ModelNotFoundError, match="nothere"):
        copy_model(store, "nothere", "x")


def test_derive_writes_ollamas_profile_layers_and_a_load_reads_them(store: Store) -> None:
    changes = ProfileChanges(
        system="You are terse.",
        template=JINJA,
        parameters={"temperature": 0.2, "stop": ["<end>"]},
        messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
    )
    statuses = _statuses(store, "derived", "base", changes)
    assert statuses[-2:] == ["writing manifest", "success"]
    assert sum(s.startswith("creating new layer sha256:") for s in statuses) == 4
    _, manifest, path = store.read_manifest("derived")
    kinds = {layer.media_type: layer for layer in manifest.layers}
    assert store.blob_path(kinds[SYSTEM_MEDIA_TYPE].digest).read_text() == "You are terse."
    assert store.blob_path(kinds[TEMPLATE_MEDIA_TYPE].digest).read_text() == JINJA
    params = json.loads(store.blob_path(kinds[PARAMS_MEDIA_TYPE].digest).read_bytes())
    assert params == {"temperature": 0.2, "stop": ["<end>"]}
    messages = json.loads(store.blob_path(kinds[MESSAGES_MEDIA_TYPE].digest).read_bytes())
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in manifest.layers]
    assert parse_manifest(path.read_bytes(), "x") == manifest

    files = store.resolve("derived")
    assert files.profile == ModelProfile(
        system="You are terse.",
        template=JINJA,
        parameters={"temperature": 0.2, "stop": ["<end>"]},
        messages=changes.messages or (),
    )
    assert files.tokenizer_config["chat_template"] == JINJA  # the template replaces the model's
    assert store.resolve("base").profile.is_empty()


def test_a_second_derive_merges_parameters_and_replaces_the_rest(store: Store) -> None:
    first = ProfileChanges(system="one", parameters={"temperature": 0.2, "top_k": 5})
    _statuses(store, "d1", "base", first)
    second = ProfileChanges(system="two", parameters={"temperature": 0.9})
    _statuses(store, "d2", "d1", second)
    profile = store.resolve("d2").profile
    assert profile.system == "two"
    assert profile.parameters == {"temperature": 0.9, "top_k": 5}
    assert store.resolve("d1").profile.system == "one"  # the base is untouched


def test_replacing_a_model_removes_the_blobs_only_it_used(store: Store) -> None:
    _statuses(store, "d", "base", ProfileChanges(system="old system"))
    old = {x.digest for x in store.read_manifest("d")[1].layers}
    _statuses(store, "d", "base", ProfileChanges(system="new system"))
    new = {x.digest for x in store.read_manifest("d")[1].layers}
    for digest in old - new:
        assert not store.blob_path(digest).exists()
    store.remove("d")
    assert store.resolve("base").weight_files  # the base's blobs stay


def test_an_ollama_go_template_layer_is_skipped_at_load(store: Store) -> None:
    _statuses(store, "d", "base", ProfileChanges(system="s"))
    # What a store written by Ollama holds: its Go template, as a layer.
    _, manifest, _ = store.read_manifest("d")
    blob, _ = store.add_bytes(GO.encode())
    layers = (*manifest.layers, attrs.evolve(blob, media_type=TEMPLATE_MEDIA_TYPE))
    store.commit_manifest(store.read_manifest("d")[0], attrs.evolve(manifest, layers=layers))
    files = store.resolve("d")
    assert files.profile.template is None
    assert files.tokenizer_config.get("chat_template") != GO


@pytest.mark.parametrize(
    ("text", "go"),
    [
        (GO, True),
        ("{{- range .Messages }}{{ .Content }}{{ end }}", True),
        (JINJA, False),
        ("{{ bos_token }}{% if x %}{{ 'a' if y else 'b' }}{% endif %}", False),
    ],
)
def test_go_templates_are_told_from_jinja(text: str, go: bool) -> None:
    assert is_go_template(text) is go


def test_templates_and_messages_are_checked() -> None:
    with pytest.raises(ProfileError, match="Go template"):
        check_template(GO)
    with pytest.raises(ProfileError, match="invalid chat template"):
        check_template("{% for %}")
    assert check_template(JINJA) == JINJA
    with pytest.raises(ProfileError, match="role"):
        check_messages([{"role": "wizard", "content": "x"}])
    with pytest.raises(ProfileError, match="list"):
        check_messages({"role": "user"})
    assert check_messages([{"role": "user"}]) == ({"role": "user", "content": ""},)


def test_a_stored_gguf_model_is_loaded_with_its_profile(tmp_path: Path) -> None:
    """As pulled from Ollama's registry: one GGUF layer, a Go template, params; then derived."""
    from runtime.models.source import open_checkpoint
    from runtime.store.manifest import CONFIG_MEDIA_TYPE, GGUF_MEDIA_TYPE, Manifest
    from runtime.store.names import ModelName
    from tests.registry_server import tiny_gguf

    store = Store(tmp_path / "models")
    gguf, _ = store.add_bytes(tiny_gguf(tmp_path / "tiny.gguf"))
    go, _ = store.add_bytes(GO.encode())
    params, _ = store.add_bytes(b'{"stop": ["<x>"]}')
    config, _ = store.add_bytes(b'{"model_format": "gguf"}')
    manifest = Manifest(
        config=attrs.evolve(config, media_type=CONFIG_MEDIA_TYPE),
        layers=(
            attrs.evolve(gguf, media_type=GGUF_MEDIA_TYPE),
            attrs.evolve(go, media_type=TEMPLATE_MEDIA_TYPE),
            attrs.evolve(params, media_type=PARAMS_MEDIA_TYPE),
        ),
    )
    store.commit_manifest(ModelName.parse("pulled"), manifest)
    pulled = open_checkpoint("pulled", store=store).files
    assert pulled.profile == ModelProfile(parameters={"stop": ["<x>"]})  # Go template skipped
    assert pulled.tokenizer_config.get("chat_template") != GO

    _statuses(store, "derived", "pulled", ProfileChanges(system="s", template=JINJA))
    derived = open_checkpoint("derived", store=store).files
    assert derived.profile.system == "s"
    assert derived.profile.parameters == {"stop": ["<x>"]}
    assert derived.tokenizer_config["chat_template"] == JINJA


def test_an_import_from_a_stored_model_keeps_its_profile(store: Store) -> None:
    changes = ProfileChanges(
        system="kept", parameters={"top_k": 7}, messages=({"role": "user", "content": "a"},)
    )
    _statuses(store, "derived", "base", changes)
    import_model("derived", "requantized", store=store, quantize="q8")
    profile = store.resolve("requantized").profile
    assert profile.system == "kept"
    assert profile.parameters == {"top_k": 7}
    assert profile.messages == ({"role": "user", "content": "a"},)
