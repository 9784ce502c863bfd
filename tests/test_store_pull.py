"""Pulling from Ollama's registry protocol, against a registry on 127.0.0.1
(``tests/registry_server.py``), and from a pre-filled Hugging Face cache offline.

A pull ends in a loadable model with the registry's manifest bytes, or in a clear error with
no manifest written: a 404, a manifest of an unsupported kind, a blob whose bytes do not
match its digest; a cut download resumes with ``Range`` where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from runtime.errors import ModelNotFoundError, PullError
from runtime.models.loader import load_model
from runtime.store import registry as registry_module
from runtime.store.layout import Store
from runtime.store.manifest import MANIFEST_MEDIA_TYPE
from runtime.store.names import ModelName
from runtime.store.pull import PullProgress, hf_repo, pull_model
from tests.registry_server import Cut, Registry, serve_registry, tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def registry() -> Iterator[Registry]:
    with serve_registry() as served:
        yield served


def _pull(name: str, store: Store, registry: Registry, **kw: object) -> list[PullProgress]:
    return list(pull_model(name, store=store, registry_url=registry.url, **kw))  # type: ignore[arg-type]


def _gguf_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.glob(".*")) if store.blobs.exists() else []


def test_pull_then_load_the_model(tmp_path: Path, registry: Registry, gguf: bytes) -> None:
    raw = registry.add_model("tiny", "q4", gguf)
    store = Store(tmp_path / "models")
    lines = _pull("tiny:q4", store, registry)
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    digest = _gguf_digest(gguf)
    blob_lines = [line for line in lines if line.digest == digest]
    assert blob_lines[-1].completed == blob_lines[-1].total == len(gguf)
    assert blob_lines[-1].to_json() == {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": len(gguf),
        "completed": len(gguf),
    }
    # The manifest is the registry's, byte for byte, where Ollama keeps it.
    path = store.manifests / "registry.ollama.ai" / "library" / "tiny" / "q4"
    assert path.read_bytes() == raw
    assert _leftovers(store) == []
    loaded = load_model("tiny:q4", store=store)
    assert loaded.name == "tiny:q4"
    assert loaded.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    reference = tmp_path / "tiny.gguf"
    reference.write_bytes(gguf)
    ids = mx.array([[5, 17, 42, 9]], dtype=mx.int32)
    ours, ref = loaded.model(ids), load_model(reference).model(ids)
    assert np.array_equal(np.array(ours), np.array(ref))


def test_a_second_pull_downloads_nothing(tmp_path: Path, registry: Registry, gguf: bytes) -> None:
    registry.add_model("tiny", "latest", gguf)
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)
    before = len(registry.requests)
    _pull("tiny", store, registry)
    assert [p for p, _ in registry.requests[before:]] == ["/v2/library/tiny/manifests/latest"]


def test_a_damaged_stored_blob_is_downloaded_again(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)
    blob = store.blob_path(_gguf_digest(gguf))
    blob.write_bytes(b"\0" * len(gguf))  # same size, other bytes
    _pull("tiny", store, registry)
    assert blob.read_bytes() == gguf


def test_a_cut_download_is_retried_from_where_it_stopped(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.cut[digest] = Cut(after=5000, times=1)
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)
    assert registry.blob_requests(digest) == [None, "bytes=5000-"]
    assert store.blob_path(digest).read_bytes() == gguf


def test_an_interrupted_pull_resumes_at_the_next_pull(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.cut[digest] = Cut(after=4096, times=2)
    store = Store(tmp_path / "models")
    with pytest.raises(
        PullError,
        match=rf"{digest} failed 2 times \(last: connection closed after 8192 bytes\); 8192 of \d+ bytes are kept: run the pull again to resume",
    ):
        _pull("tiny", store, registry, attempts=2)
    assert not store.manifest_path(ModelName.parse("tiny")).exists()  # nothing half-pulled
    partial = registry_module.partial_path(store, digest)
    assert partial.read_bytes() == gguf[:8192]  # two cuts of 4096 bytes, kept
    assert not store.blob_path(digest).exists()
    _pull("tiny", store, registry)
    assert registry.blob_requests(digest)[-1] == "bytes=8192-"
    assert store.blob_path(digest).read_bytes() == gguf
    assert not partial.exists()
    load_model("tiny", store=store)


def test_closing_the_pull_keeps_the_part_downloaded(
    tmp_path: Path, registry: Registry, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    store = Store(tmp_path / "models")
    pulling = pull_model("tiny", store=store, registry_url=registry.url)
    for line in pulling:
        if line.digest == digest and line.completed >= 3072:
            break
    pulling.close()  # Ctrl-C or a client that went away
    assert registry_module.partial_path(store, digest).stat().st_size == 3072
    _pull("tiny", store, registry)
    assert registry.blob_requests(digest)[-1] == "bytes=3072-"
    assert store.blob_path(digest).read_bytes() == gguf


def test_a_blob_that_does_not_match_its_digest_is_discarded(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.corrupt.add(digest)
    store = Store(tmp_path / "models")
    with pytest.raises(
        PullError, match=rf"blob {digest} has sha256 sha256:[0-9a-f]{{64}}.*discarded"
    ):
        _pull("tiny", store, registry)
    assert not store.blob_path(digest).exists()
    assert not registry_module.partial_path(store, digest).exists()
    assert not store.manifest_path(ModelName.parse("tiny")).exists()


def test_a_blob_longer_than_the_manifest_says_is_discarded(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    raw = json.loads(registry.add_model("tiny", "latest", gguf))
    raw["layers"][0]["size"] -= 10
    registry.set_manifest("tiny", "latest", json.dumps(raw).encode())
    store = Store(tmp_path / "models")
    with pytest.raises(PullError, match="longer than the manifest says"):
        _pull("tiny", store, registry)
    assert _leftovers(store) == []


def test_an_unknown_model_is_a_404_not_found(tmp_path: Path, registry: Registry) -> None:
    store = Store(tmp_path / "models")
    with pytest.raises(
        ModelNotFoundError, match=r"pulling nothing:latest.*no such model or tag \(404\)"
    ):
        _pull("nothing", store, registry)
    assert not store.manifests.exists()


def test_a_missing_blob_names_the_blob(tmp_path: Path, registry: Registry, gguf: bytes) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    del registry.blobs[digest]
    with pytest.raises(PullError, match=rf"answered 404 for blob {digest}: blob_unknown"):
        _pull("tiny", Store(tmp_path / "models"), registry)


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (
            "application/vnd.docker.distribution.manifest.list.v2+json",
            {"schemaVersion": 2, "manifests": []},
            r"manifest list .*only single Docker v2 image manifests",
        ),
        (
            MANIFEST_MEDIA_TYPE,
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"},
            r"unsupported manifest kind 'application/vnd.oci.image.manifest.v1\+json'",
        ),
        (MANIFEST_MEDIA_TYPE, {"schemaVersion": 1}, r"unsupported manifest schemaVersion 1"),
    ],
)
def test_a_manifest_of_an_unsupported_kind_is_refused(
    tmp_path: Path, registry: Registry, kind: str, body: dict[str, object], message: str
) -> None:
    registry.set_manifest("odd", "latest", json.dumps(body).encode(), content_type=kind)
    store = Store(tmp_path / "models")
    with pytest.raises(PullError, match=rf"pulling odd:latest.*{message}"):
        _pull("odd", store, registry)
    assert not store.manifests.exists()


def test_a_model_with_a_layer_this_store_cannot_run_is_refused(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    raw = json.loads(registry.add_model("vision", "latest", gguf))
    raw["layers"].append(
        {"mediaType": "application/vnd.ollama.image.projector", **registry.add_blob(b"proj")}
    )
    registry.set_manifest("vision", "latest", json.dumps(raw).encode())
    with pytest.raises(PullError, match="vision projector"):
        _pull("vision", Store(tmp_path / "models"), registry)
    assert registry.blob_requests(_gguf_digest(gguf)) == []  # refused before downloading


def test_an_unreachable_registry_is_named(tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"cannot reach the registry at http://127\.0\.0\.1:9"):
        list(pull_model("tiny", store=Store(tmp_path / "m"), registry_url="http://127.0.0.1:9"))


def test_the_registry_url_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf, namespace="someone")
    monkeypatch.setenv(registry_module.ENV_REGISTRY, registry.url)
    store = Store(tmp_path / "models")
    list(pull_model("someone/tiny", store=store))
    assert (store.manifests / "registry.ollama.ai" / "someone" / "tiny" / "latest").exists()


def test_replacing_a_tag_drops_the_blobs_only_the_old_version_used(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)
    changed = gguf + b"\0" * 32  # trailing padding: another blob of the same model
    registry.add_model("tiny", "latest", changed)
    _pull("tiny", store, registry)
    assert not store.blob_path(_gguf_digest(gguf)).exists()
    assert store.blob_path(_gguf_digest(changed)).exists()


# ---- the Hugging Face hub, offline ----


def test_hf_names() -> None:
    assert hf_repo("hf.co/Org/Repo") == ("Org/Repo", None, "hf.co/Org/Repo:latest")
    assert hf_repo("huggingface.co/Org/Repo:main") == ("Org/Repo", "main", "hf.co/Org/Repo:main")
    with pytest.raises(ModelNotFoundError, match=r"hf\.co/ORG/REPO"):
        hf_repo("hf.co/just-a-repo")


def _fill_hf_cache(cache: Path, repo: str, folder: Path, revision: str = "main") -> None:
    """The layout huggingface_hub writes: blobs, a snapshot of links, a ref per revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)


def test_hf_pull_from_an_offline_cache_imports_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.testing.models import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "src", "llama")
    cache = tmp_path / "hf"
    _fill_hf_cache(cache / "hub", "Org/Tiny", folder)
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache / "hub"))
    store = Store(tmp_path / "models")
    lines = list(pull_model("hf.co/Org/Tiny", store=store))
    assert [line.status for line in lines] == [
        "pulling Org/Tiny from the Hugging Face hub",
        "importing Org/Tiny as hf.co/Org/Tiny:latest",
        "success",
    ]
    ours = load_model("hf.co/Org/Tiny", store=store)
    assert ours.name == "hf.co/Org/Tiny:latest"
    with pytest.raises(PullError, match="not in the Hugging Face cache"):
        list(pull_model("hf.co/Org/Other", store=store))
    gguf_only = tmp_path / "gguf-repo"
    gguf_only.mkdir()
    (gguf_only / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    _fill_hf_cache(cache / "hub", "Org/Tiny-GGUF", gguf_only)
    with pytest.raises(PullError, match=r"config\.json: missing.*safetensors/MLX model folder"):
        list(pull_model("hf.co/Org/Tiny-GGUF", store=store))


def test_two_pulls_of_one_blob_download_it_once(
    tmp_path: Path, registry: Registry, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    monkeypatch.setattr(registry_module, "LOCK_POLL_S", 0.0)
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    store = Store(tmp_path / "models")
    first = pull_model("tiny", store=store, registry_url=registry.url)
    second = pull_model("tiny", store=store, registry_url=registry.url)
    for line in first:
        if line.digest == digest and line.completed >= 2048:
            break
    waiting = [line for line, _ in zip(second, range(20), strict=False) if line.digest == digest]
    # The second pull waits on the first one's download and shows how far it is.
    assert waiting[-1].completed == 2048
    assert [line.status for line in first][-1] == "success"
    assert [line.status for line in second][-1] == "success"
    assert registry.blob_requests(digest) == [None]
    assert store.blob_path(digest).read_bytes() == gguf
    assert _leftovers(store) == []


def test_a_server_that_ignores_range_is_read_from_the_start(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.cut[digest] = Cut(after=3000, times=1)
    registry.ignore_range = True
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)
    assert registry.blob_requests(digest) == [None, "bytes=3000-"]
    assert store.blob_path(digest).read_bytes() == gguf


def test_a_registry_in_trouble_is_retried_then_named(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.fail[digest] = 2
    store = Store(tmp_path / "models")
    _pull("tiny", store, registry)  # two 503s, then the blob
    assert store.blob_path(digest).read_bytes() == gguf
    registry.add_model("other", "latest", gguf + b"\0" * 32)
    registry.fail[_gguf_digest(gguf + b"\0" * 32)] = 5
    with pytest.raises(PullError, match=r"failed 3 times \(last: HTTP 503\)"):
        _pull("other", store, registry)


def test_a_registry_on_another_host_is_reached_over_http_when_insecure(
    tmp_path: Path, registry: Registry, gguf: bytes
) -> None:
    registry.add_model("tiny", "v1", gguf, namespace="team")
    host = registry.url.removeprefix("http://")
    store = Store(tmp_path / "models")
    list(pull_model(f"{host}/team/tiny:v1", store=store, insecure=True))
    assert (store.manifests / host / "team" / "tiny" / "v1").exists()
    load_model(f"{host}/team/tiny:v1", store=store)


class _FullDisk:
    """A partial file whose disk fills up after ``room`` bytes."""

    def __init__(self, f: Any, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data: bytes) -> int:
        if self._f.tell() + len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_a_full_disk_stops_the_pull_and_keeps_the_part(
    tmp_path: Path, registry: Registry, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    opened = registry_module._open_partial
    monkeypatch.setattr(registry_module, "_open_partial", lambda p: _FullDisk(opened(p), 4096))
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    store = Store(tmp_path / "models")
    with pytest.raises(PullError, match=r"no space left on the disk.*4096 of \d+ bytes .* kept"):
        _pull("tiny", store, registry)
    assert len(registry.blob_requests(digest)) == 1  # not retried: a full disk stays full
    monkeypatch.setattr(registry_module, "_open_partial", opened)
    _pull("tiny", store, registry)
    assert registry.blob_requests(digest)[-1] == "bytes=4096-"


def test_a_pull_waiting_on_one_that_fails_starts_a_new_download(
    tmp_path: Path, registry: Registry, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    monkeypatch.setattr(registry_module, "LOCK_POLL_S", 0.0)
    registry.add_model("tiny", "latest", gguf)
    digest = _gguf_digest(gguf)
    registry.corrupt.add(digest)
    store = Store(tmp_path / "models")
    first = pull_model("tiny", store=store, registry_url=registry.url)
    second = pull_model("tiny", store=store, registry_url=registry.url)
    for line in first:
        if line.digest == digest and line.completed >= 2048:
            break
    for _, _ in zip(second, range(10), strict=False):
        pass  # waiting on the first one's lock
    registry.corrupt.clear()
    with pytest.raises(PullError, match="does not match the manifest"):
        list(first)
    assert [line.status for line in second][-1] == "success"
    assert store.blob_path(digest).read_bytes() == gguf
