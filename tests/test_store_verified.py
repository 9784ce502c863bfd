"""A load hashes each blob once, then again only when its file changes (``runtime.store.verified``).

The clock the record is judged by is moved (``verified.now``) instead of waiting: a blob
counts as settled once its ctime is ``RACY_SECONDS`` older than the hashing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import runtime.store.reading
from runtime.errors import ModelLoadError
from runtime.store import verified
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def store(tmp_path: Path, folder: Path) -> Store:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny", store=store)
    return store


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The blobs ``resolve`` hashes, in order."""
    calls: list[Path] = []
    real = runtime.store.reading.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(runtime.store.reading, "sha256_file", counting)
    return calls


def _settle(store: Store, monkeypatch: pytest.MonkeyPatch, *, settled: bool) -> None:
    """Hash as if every blob changed just over (``settled``) or just under ``RACY_SECONDS``
    before."""
    ctimes = [p.stat().st_ctime_ns / 1e9 for p in store.blobs.iterdir()]
    at = (
        max(ctimes) + verified.RACY_SECONDS + 0.1
        if settled
        else min(ctimes) + verified.RACY_SECONDS - 0.1
    )
    monkeypatch.setattr(verified, "now", lambda: at)


def test_an_unchanged_blob_is_hashed_once(
    store: Store, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _settle(store, monkeypatch, settled=True)
    store.resolve("tiny")
    blobs = len(hashed)
    assert blobs > 10  # config, tensors, JSON layers
    assert len(json.loads((store.root / verified.FILE_NAME).read_text())) == blobs
    store.resolve("tiny")
    assert len(hashed) == blobs  # nothing hashed the second time


def test_a_blob_hashed_right_after_a_change_is_hashed_again(
    store: Store, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timestamps move in ticks: a change in the same tick as the hashing would not show.
    _settle(store, monkeypatch, settled=False)
    store.resolve("tiny")
    first = len(hashed)
    store.resolve("tiny")
    assert len(hashed) == 2 * first
    assert not (store.root / verified.FILE_NAME).exists()


def test_a_blob_changed_in_place_is_hashed_again_and_refused(
    store: Store, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = store.resolve("tiny")
    blob = max(files.weight_files, key=lambda p: p.stat().st_size)
    os.utime(blob, ns=(10**18, 10**18))  # a distinct mtime, whatever the clock's tick
    _settle(store, monkeypatch, settled=True)
    store.resolve("tiny")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    blob.write_bytes(bytes(data))
    hashed.clear()
    with pytest.raises(ModelLoadError, match=rf"{blob.name.replace('-', ':')}.* is corrupt"):
        store.resolve("tiny")
    assert hashed == [blob]  # only the changed blob


def test_a_damaged_or_unwritable_record_only_costs_hashing(
    store: Store, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _settle(store, monkeypatch, settled=True)
    record = store.root / verified.FILE_NAME
    record.write_bytes(b'{"sha256:12": [1, 2], "x": ')
    store.resolve("tiny")
    assert hashed
    assert isinstance(json.loads(record.read_text()), dict)  # rewritten whole

    def no_space(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    record.unlink()
    monkeypatch.setattr(verified.tempfile, "mkstemp", no_space)
    store.resolve("tiny")  # the record cannot be written: the load still works
    assert not record.exists()
    assert not list(store.root.glob(".partial-*"))
