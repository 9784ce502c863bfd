"""A full disk during ``import`` leaves the store as it was.

The store writes every byte through one seam (``runtime.store.layout._open_for_write``); the
tests wrap it so the disk fills after a chosen number of bytes, and check that the import
fails with a clear error, that no blob, manifest or temp file of it is left, that the models
already stored are untouched, and that the same import succeeds once there is room.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np
import pytest

import runtime.store.layout
from cli.main import main
from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.models.loader import load_model
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder

IDS = mx.array([[5, 17, 42, 9]], dtype=mx.int32)


class _Disk:
    """The store's writes, with room for ``room`` more bytes; past it a write fails with
    ENOSPC (after writing what fits, as a real disk does), or with ``silent`` loses the rest
    without an error (what MLX did when it wrote to a path)."""

    def __init__(self, room: float = float("inf"), *, silent: bool = False) -> None:
        self.room = room
        self.silent = silent
        self.written = 0

    def open(self, path: Path) -> BinaryIO:
        return _File(path.open("wb"), self)  # type: ignore[return-value]


class _File:
    def __init__(self, file: BinaryIO, disk: _Disk) -> None:
        self.file = file
        self.disk = disk

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        fits = int(max(0, min(len(chunk), self.disk.room - self.disk.written)))
        self.file.write(chunk[:fits])
        self.disk.written += fits
        if fits < len(chunk) and not self.disk.silent:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()


def _files(store: Store) -> dict[str, str]:
    """Every file under blobs/ and manifests/ (temp files included) -> sha256 of its bytes."""
    out = {}
    for folder in (store.blobs, store.manifests):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out[str(path.relative_to(store.root))] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("src")
    return make_tiny_folder(root / "old"), make_tiny_folder(root / "new", "qwen2", seed=1)


@pytest.fixture
def store(tmp_path: Path, sources: tuple[Path, Path]) -> Store:
    store = Store(tmp_path / "models")
    import_model(sources[0], "old", store=store)
    return store


def _logits(store: Store, name: str) -> np.ndarray:
    return np.array(load_model(name, store=store).model(IDS))


def _fails_and_leaves_the_store_as_it_was(
    store: Store, new: Path, error: type[BaseException]
) -> None:
    """Importing ``new`` fails with ``error``, and the store is as it was."""
    before, old_logits = _files(store), _logits(store, "old")
    with pytest.raises(error) as info:
        import_model(new, "new", store=store)
    if error is OSError:
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.ENOSPC
    assert _files(store) == before  # no blob, manifest or temp file of the failed import
    with pytest.raises(ModelNotFoundError):
        store.resolve("new")
    np.testing.assert_array_equal(_logits(store, "old"), old_logits)


def test_a_full_disk_at_any_byte_leaves_the_store_as_it_was(
    tmp_path: Path, store: Store, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    new = sources[1]
    counter = _Disk()
    monkeypatch.setattr(runtime.store.layout, "_open_for_write", counter.open)
    import_model(new, "new", store=Store(shutil.copytree(store.root, tmp_path / "scratch")))
    total = counter.written  # what the whole import writes: tensor blobs, JSON, manifest
    # The first byte, inside tensor blobs, inside the JSON layers and in the manifest (last).
    for room in [0, 1, total // 5, total // 2, total * 9 // 10, total - 300, total - 1]:
        disk = _Disk(room)
        monkeypatch.setattr(runtime.store.layout, "_open_for_write", disk.open)
        _fails_and_leaves_the_store_as_it_was(store, new, OSError)
    monkeypatch.undo()
    import_model(new, "new", store=store)  # with room again, the same import works
    _logits(store, "new")


def test_a_full_disk_at_fsync_leaves_the_store_as_it_was(
    tmp_path: Path, store: Store, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems (NFS, delayed allocation) report ENOSPC only when data is flushed.
    new = sources[1]
    fsync = _Fsync(runtime.store.layout._fsync)
    monkeypatch.setattr(runtime.store.layout, "_fsync", fsync)
    scratch = Store(shutil.copytree(store.root, tmp_path / "scratch"))  # the same blobs reused
    import_model(new, "new", store=scratch)
    last = fsync.calls  # the manifest folder's, after the manifest's own (second to last)
    # A blob's data, the blobs/ folder after its rename, later blobs, the manifest's data.
    for failing in [1, 2, 3, last - 3, last - 1]:
        fsync.calls, fsync.failing = 0, failing
        _fails_and_leaves_the_store_as_it_was(store, new, OSError)
    # Once the manifest is renamed into place the import has happened: a failing flush of
    # its folder is not reported as a failure that left the store unchanged.
    fsync.calls, fsync.failing = 0, last
    import_model(new, "new", store=store)
    np.testing.assert_array_equal(_logits(store, "new"), _logits(scratch, "new"))


class _Fsync:
    """``os.fsync`` failing with ENOSPC at call number ``failing``."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self.real = real
        self.calls = 0
        self.failing = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


def test_a_write_lost_without_an_error_fails_the_import(
    store: Store, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _Disk(5000, silent=True)
    monkeypatch.setattr(runtime.store.layout, "_open_for_write", disk.open)
    _fails_and_leaves_the_store_as_it_was(store, sources[1], ModelLoadError)


def test_import_on_a_full_disk_exits_1_with_one_line(
    store: Store,
    sources: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _files(store)
    argv = ["import", str(sources[1]), "new", "--models-dir", str(store.root)]
    monkeypatch.setattr(runtime.store.layout, "_open_for_write", _Disk(20_000).open)
    assert main(argv) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert "no space left on the disk of" in errors[0]
    assert "the import of new was undone" in errors[0]
    assert "Traceback" not in err
    assert "imported" not in out
    assert _files(store) == before
    monkeypatch.undo()
    assert main(argv) == 0
