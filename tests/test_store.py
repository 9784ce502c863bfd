"""The store layer: names, manifest validation, verified resolve, list, rm, stale temp files.

A tiny model is imported once per test (``stored``) and then damaged in specific ways; every
damage must end in a ``ModelLoadError`` naming the model and the blob, never a crash.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.store.manifest import TENSOR_MEDIA_TYPE
from runtime.store.names import InvalidNameError, ModelName
from runtime.testing.models import make_tiny_folder

# ---- names ----


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
        ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
        ("me/smollm2:q4", ("registry.ollama.ai", "me", "smollm2", "q4")),
        ("hf.co/me/smollm2:q4_K", ("hf.co", "me", "smollm2", "q4_K")),
        ("localhost:5000/me/m", ("localhost:5000", "me", "m", "latest")),
        ("localhost:5000/me/m:v1.2", ("localhost:5000", "me", "m", "v1.2")),
    ],
)
def test_name_parsing(text: str, parts: tuple[str, str, str, str]) -> None:
    name = ModelName.parse(text)
    assert name.parts == parts
    assert ModelName.parse(name.short) == name


def test_short_names_drop_only_defaults() -> None:
    assert ModelName.parse("registry.ollama.ai/library/a:latest").short == "a:latest"
    assert ModelName.parse("x/a").short == "x/a:latest"
    assert ModelName.parse("h.io/library/a:t").short == "h.io/library/a:t"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "../../etc",
        "../../etc:passwd",
        "..",
        "a/../b",
        "/etc/passwd",
        "a//b",
        "a:",
        "a:../x",
        "a:b/c",
        "h/n/m/x",
        "-dash",
        "name with space",
        "nul\x00",
        "a" * 81,
    ],
)
def test_invalid_names_are_rejected_with_a_message(text: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid model name"):
        ModelName.parse(text)


def test_path_traversal_never_reaches_the_file_system(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("{}")
    store = Store(tmp_path / "a" / "b" / "models")
    with pytest.raises(ModelNotFoundError, match="invalid model name"):
        store.resolve("../../../../etc:passwd")


# ---- a stored tiny model, and damage to it ----


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def store(tmp_path: Path, folder: Path) -> Store:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny:1", store=store, quantize="q4", group_size=32)
    return store


def _manifest_path(store: Store, name: str = "tiny:1") -> Path:
    return store.manifest_path(ModelName.parse(name))


def _tensor_blob(store: Store) -> tuple[str, Path]:
    manifest = json.loads(_manifest_path(store).read_text())
    layer = next(x for x in manifest["layers"] if x["mediaType"] == TENSOR_MEDIA_TYPE)
    return layer["digest"], store.blob_path(layer["digest"])


def test_resolve_returns_verified_files(store: Store) -> None:
    files = store.resolve("tiny:1")
    assert files.name == "tiny:1"
    assert files.config["model_type"] == "llama"
    assert "quantization" not in files.config  # the blobs' metadata says it
    assert files.tokenizer_config["chat_template"]
    assert all(p.parent == store.blobs for p in files.weight_files)
    assert files.digest.startswith("sha256:")
    assert files.size_bytes == sum(p.stat().st_size for p in files.weight_files)


def test_unknown_name_is_not_found(store: Store) -> None:
    with pytest.raises(
        ModelNotFoundError, match=r"'nope:latest' not found.*mlxrunner pull nope:latest"
    ):
        store.resolve("nope")


def test_digest_mismatch_names_blob_and_model(store: Store) -> None:
    digest, path = _tensor_blob(store)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"'tiny:1'.*{digest}.*corrupt"):
        store.resolve("tiny:1")


def test_truncated_blob_names_blob_and_model(store: Store) -> None:
    digest, path = _tensor_blob(store)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=rf"'tiny:1'.*{digest}.*truncated"):
        store.resolve("tiny:1")


def test_missing_blob_names_blob_and_model(store: Store) -> None:
    digest, path = _tensor_blob(store)
    path.unlink()
    with pytest.raises(ModelLoadError, match=rf"'tiny:1'.*{digest}.*missing"):
        store.resolve("tiny:1")


@pytest.mark.parametrize(
    ("media_type", "message"),
    [
        ("application/vnd.example.mystery", r"'tiny:1'.*unknown media type.*mystery"),
        ("application/vnd.ollama.image.adapter", r"'tiny:1'.*LoRA adapter \(not supported\)"),
        # A GGUF layer (what Ollama's registry models are) is a whole model by itself.
        ("application/vnd.ollama.image.model", r"'tiny:1'.*GGUF model layer beside safetensors"),
    ],
)
def test_a_layer_of_another_kind_is_refused_with_what_to_do(
    store: Store, media_type: str, message: str
) -> None:
    path = _manifest_path(store)
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["mediaType"] = media_type
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=message):
        store.resolve("tiny:1")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"schemaVersion": 1}',
        '{"schemaVersion": 2, "config": {}, "layers": []}',
        '{"schemaVersion": 2, "config": {"mediaType": "application/vnd.docker.container.image.v1+json",'
        ' "digest": "sha256:../../x", "size": 1}, "layers": []}',
        '{"schemaVersion": 2, "config": {"mediaType": "application/vnd.docker.container.image.v1+json",'
        ' "digest": "sha256:' + "0" * 64 + '", "size": 1}, "layers": {}}',
    ],
)
def test_malformed_manifest_is_a_clear_error(store: Store, text: str) -> None:
    _manifest_path(store).write_text(text)
    with pytest.raises(ModelLoadError, match=r"'tiny:1'.*manifest|'tiny:1'.*config|digest"):
        store.resolve("tiny:1")


def test_store_root_follows_mlxrunner_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXRUNNER_HOME", str(tmp_path / "home"))
    assert Store.default().root == tmp_path / "home" / "models"
    monkeypatch.delenv("MLXRUNNER_HOME")
    assert Store.default().root == Path.home() / ".mlxrunner" / "models"
    assert Store.at(str(tmp_path / "x")).root == tmp_path / "x"


# ---- list and rm ----


def test_list_shows_every_model_and_survives_damage(store: Store, folder: Path) -> None:
    import_model(folder, "other/tiny:f32", store=store)
    entries = {e.name: e for e in store.list_models()}
    assert set(entries) == {"tiny:1", "other/tiny:f32"}
    assert entries["tiny:1"].quantization == "int4 g32"
    assert entries["other/tiny:f32"].quantization == "F32"
    assert entries["tiny:1"].size_bytes < entries["other/tiny:f32"].size_bytes
    _manifest_path(store).write_text("{broken")
    entries = {e.name: e for e in store.list_models()}
    assert "damaged" in entries["tiny:1"].quantization


def test_rm_keeps_blobs_another_manifest_uses(store: Store, folder: Path) -> None:
    import_model(folder, "tiny:2", store=store, quantize="q4", group_size=32)  # same blobs
    import_model(folder, "tiny:dense", store=store)
    all_blobs = set(store.blobs.iterdir())
    assert store.remove("tiny:1") == []  # tiny:2 uses all of them
    assert set(store.blobs.iterdir()) == all_blobs
    removed = store.remove("tiny:2")
    assert removed
    assert not any(store.blob_path(d).exists() for d in removed)
    store.resolve("tiny:dense")  # untouched
    store.remove("tiny:dense")
    assert list(store.blobs.iterdir()) == []
    assert list(store.manifests.iterdir()) == []  # empty name dirs removed too
    with pytest.raises(ModelNotFoundError):
        store.remove("tiny:dense")


def test_rm_removes_a_damaged_manifest(store: Store) -> None:
    _manifest_path(store).write_text("{broken")
    store.remove("tiny:1")
    with pytest.raises(ModelNotFoundError):
        store.resolve("tiny:1")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc./:-_\\ \x00A9", max_size=24))
def test_any_parsed_name_stays_inside_the_store(text: str) -> None:
    try:
        name = ModelName.parse(text)
    except InvalidNameError:
        return
    root = Path("/store/models")
    path = Store(root).manifest_path(name)
    assert path.resolve().is_relative_to(root / "manifests")
    assert len(path.relative_to(root / "manifests").parts) == 4
    assert all(part not in (".", "..") and "/" not in part for part in name.parts)


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old, new = store.temp_blob(), store.temp_blob()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temps() == 1
    assert not old.exists()
    assert new.exists()
