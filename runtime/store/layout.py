"""The model store: Ollama's on-disk layout, resolved by name, listed, written and pruned.

``<root>/manifests/<host>/<namespace>/<name>/<tag>`` (JSON, ``runtime.store.manifest``) and
``<root>/blobs/sha256-<hex>``. ``resolve`` turns a name into ``ModelFiles`` after checking every
blob it will read against its digest (``runtime.store.reading`` checks and reads them), so a
damaged store fails with an error naming the blob and the model instead of loading wrong
weights; a blob hashed at an earlier load whose file has not changed since is not hashed again
(``runtime.store.verified``). Writes (``runtime.store.importer`` puts blobs, then the manifest)
go through ``write_blob``/``commit_manifest``: temp file, fsync, rename, so a crash leaves
either no manifest or a complete one, and a failed write (a full disk) removes its temp file
before the error goes on; ``rm`` never deletes a blob another manifest uses.
``Store.default()`` is ``$MLXRUNNER_HOME/models`` (``~/.mlxrunner/models``); an Ollama
``models`` directory works too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.model_files import ModelFiles
from runtime.store import reading
from runtime.store.manifest import Layer, Manifest, parse_manifest
from runtime.store.names import ModelName
from runtime.store.profile import ModelProfile
from runtime.store.reading import sha256_file
from runtime.store.verified import VerifiedBlobs

TEMP_PREFIX = ".partial-"  # the store's temp files; never a valid name part


@attrs.frozen(kw_only=True)
class ModelEntry:
    """One line of ``mlxrunner list``."""

    name: str
    digest: str  # sha256 of the manifest, as Ollama reports it
    size_bytes: int
    quantization: str
    modified_at: float


def _fsync(fd: int) -> None:
    """``os.fsync``; one name for the tests to interrupt an import at."""
    os.fsync(fd)


def _open_for_write(path: Path) -> BinaryIO:
    """Open a temp file to write; every byte the store writes goes through here (the tests
    wrap it to fill the disk at a chosen byte)."""
    return path.open("wb")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    @classmethod
    def default(cls) -> Store:
        home = os.environ.get("MLXRUNNER_HOME") or str(Path.home() / ".mlxrunner")
        return cls(Path(home) / "models")

    @classmethod
    def at(cls, models_dir: str | Path | None) -> Store:
        """``--models-dir`` if given, else the default store."""
        return cls(Path(models_dir)) if models_dir else cls.default()

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def blob_path(self, digest: str) -> Path:
        return reading.blob_file(self.blobs, digest)

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.parts)

    # ---- reading ----

    def read_manifest(self, name: str | ModelName) -> tuple[ModelName, Manifest, Path]:
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        path = self.manifest_path(parsed)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"model {parsed.short!r} not found in {self.root} "
                f"(pull it with `mlxrunner pull {parsed.short}`, or import it with "
                "`mlxrunner import SRC NAME`)"
            ) from None
        except OSError as exc:
            raise ModelLoadError(f"model {parsed.short!r}: cannot read {path} ({exc})") from exc
        return parsed, parse_manifest(data, f"model {parsed.short!r} ({path})"), path

    def check_blob(
        self, model: str, layer: Layer, *, verify: bool = True, known: VerifiedBlobs | None = None
    ) -> Path:
        """The blob's path once its size (and, with ``verify``, its sha256) match the manifest.

        With ``known``, a blob hashed before and unchanged since is not hashed again.
        """
        return reading.check_blob(self.blobs, model, layer, verify=verify, known=known)

    def gguf_blob(self, name: str, *, verify: bool = True) -> tuple[str, str, Path] | None:
        """(short name, manifest digest, GGUF path) when ``name`` is a GGUF model (as pulled
        from Ollama's registry), its used blobs checked as ``resolve`` checks them; ``None``
        for a safetensors model."""
        parsed, manifest, _ = self.read_manifest(name)
        layer = manifest.gguf_layer()
        if layer is None:
            return None
        known = VerifiedBlobs(self.root) if verify else None
        for used in manifest.used_layers():
            self.check_blob(parsed.short, used, verify=verify, known=known)
        if known is not None:
            known.save()
        return parsed.short, manifest.digest, self.blob_path(layer.digest)

    def profile(self, name: str, *, verify: bool = True) -> ModelProfile:
        """The system prompt, template, parameters and messages ``name``'s manifest holds."""
        parsed, manifest, _ = self.read_manifest(name)
        return reading.read_profile(self.blobs, parsed.short, manifest, verify=verify, known=None)

    def resolve(self, name: str, *, verify: bool = True) -> ModelFiles:
        """The files of ``name``, every used blob's digest checked (``ModelLoadError`` if not;
        with ``verify``, a blob is hashed once and again only when its file changes)."""
        parsed, manifest, path = self.read_manifest(name)
        model = parsed.short
        known = VerifiedBlobs(self.root) if verify else None
        for layer in manifest.used_layers():
            self.check_blob(model, layer, verify=verify, known=known)
        profile = reading.read_profile(self.blobs, model, manifest, verify=verify, known=known)
        if known is not None:
            known.save()
        return reading.model_files(self.blobs, model, manifest, path, profile)

    def names(self) -> Iterator[ModelName]:
        """Every manifest in the store whose path is a valid name (temp files skipped)."""
        if not self.manifests.is_dir():
            return
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith(TEMP_PREFIX):
                continue
            host, namespace, name, tag = path.relative_to(self.manifests).parts
            try:
                yield ModelName.parse(f"{host}/{namespace}/{name}:{tag}")
            except ModelNotFoundError:
                continue

    def list_models(self) -> list[ModelEntry]:
        """Every model in the store, by name. A damaged manifest is listed with ``?`` fields."""
        out = []
        for name in self.names():
            path = self.manifest_path(name)
            try:
                stat = path.stat()
                digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue  # removed since the directory was listed
            try:
                _, manifest, _ = self.read_manifest(name)
                digest = manifest.digest
                size = manifest.config.size + sum(layer.size for layer in manifest.layers)
                config = reading.read_json(self.blobs, name.short, manifest.config)
                quant = str(config.get("file_type", "?"))
            except (ModelLoadError, AttributeError):
                size, quant = 0, "? (damaged)"
            out.append(
                ModelEntry(
                    name=name.short,
                    digest=digest,
                    size_bytes=size,
                    quantization=quant,
                    modified_at=stat.st_mtime,
                )
            )
        return out

    # ---- writing ----

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for committing a manifest or removing one (``flock`` on ``.lock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def temp_blob(self) -> Path:
        """A fresh temp path in ``blobs/`` (same file system as the final blob, for rename)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".safetensors", dir=self.blobs)
        os.close(fd)
        return Path(name)

    def add_blob(self, temp: Path) -> tuple[Layer, bool]:
        """Move a finished temp file into ``blobs/`` under its digest; (layer, reused)."""
        try:
            digest = sha256_file(temp)
            size = temp.stat().st_size
            final = self.blob_path(digest)
            # Same digest: reuse the blob, unless it was damaged since (then replace it).
            if final.exists() and final.stat().st_size == size and sha256_file(final) == digest:
                return Layer(media_type="", digest=digest, size=size), True
            with temp.open("rb") as f:
                _fsync(f.fileno())
            os.replace(temp, final)
            try:
                fsync_dir(self.blobs)
            except BaseException:
                final.unlink(missing_ok=True)  # the caller never learns its digest: not added
                raise
            return Layer(media_type="", digest=digest, size=size), False
        finally:
            temp.unlink(missing_ok=True)

    def write_blob(
        self, fill: Callable[[BinaryIO], object], *, check: Callable[[Path], object] | None = None
    ) -> tuple[Layer, bool]:
        """Write a blob with ``fill(file)``, ``check`` the written file, then ``add_blob`` it.

        Whatever fails (a full disk raises ``OSError`` from a write, ``check`` finds a short
        file), the temp file is removed before the error goes on.
        """
        temp = self.temp_blob()
        try:
            with _open_for_write(temp) as f:
                fill(f)
            if check is not None:
                check(temp)
            return self.add_blob(temp)
        finally:
            temp.unlink(missing_ok=True)

    def add_bytes(self, data: bytes) -> tuple[Layer, bool]:
        return self.write_blob(lambda f: f.write(data))

    def commit_manifest(
        self, name: ModelName, manifest: Manifest, raw: bytes | None = None
    ) -> Path:
        """Write the manifest atomically, after checking under the lock that its blobs exist.

        ``raw``: the bytes to write instead of ``manifest.to_bytes()`` (a pulled manifest is
        kept as the registry sent it, so its digest stays the registry's; a copy keeps its
        source's)."""
        path = self.manifest_path(name)
        with self.lock():
            for digest in sorted(manifest.digests()):
                if not self.blob_path(digest).exists():
                    raise ModelLoadError(
                        f"model {name.short!r}: blob {digest} vanished during the import "
                        "(removed by a concurrent `rm`?); run the import again"
                    )
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
            os.close(fd)
            try:
                with _open_for_write(Path(temp)) as f:
                    f.write(manifest.to_bytes() if raw is None else raw)
                    f.flush()
                    _fsync(f.fileno())
                os.replace(temp, path)
            finally:
                Path(temp).unlink(missing_ok=True)
            # The atomic rename is done: the import has succeeded. A failed flush of the folder
            # (a full disk) only means a crash could bring back the previous state, which is a
            # consistent store; reporting the import as failed would be the lie.
            with contextlib.suppress(OSError):
                fsync_dir(path.parent)
        return path

    def remove(self, name: str) -> list[str]:
        """Remove a manifest and the blobs no other manifest uses; return the removed digests."""
        parsed = ModelName.parse(name)
        with self.lock():
            path = self.manifest_path(parsed)
            try:
                manifest: Manifest | None = self.read_manifest(parsed)[1]
            except ModelNotFoundError:
                raise
            except ModelLoadError:
                manifest = None  # a damaged manifest can still be removed; its blobs are kept
            path.unlink()
            for parent in path.parents:  # drop empty tag/name/namespace/host dirs
                if parent == self.manifests:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()
            return self._prune(manifest.digests()) if manifest is not None else []

    def prune(self, candidates: set[str]) -> list[str]:
        """Remove those of ``candidates`` no manifest uses (after a re-import replaced one)."""
        with self.lock():
            return self._prune(candidates)

    def _prune(self, candidates: set[str]) -> list[str]:
        still_used: set[str] = set()
        for other in self.names():
            try:
                still_used |= self.read_manifest(other)[1].digests()
            except ModelLoadError:
                return []  # cannot tell what a damaged manifest uses: keep every blob
        removed = sorted(candidates - still_used)
        for digest in removed:
            self.blob_path(digest).unlink(missing_ok=True)
        return removed

    def remove_stale_temps(self, *, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by killed writers (any still running is younger)."""
        count = 0
        current = time.time()
        if not self.root.is_dir():
            return 0
        for temp in self.root.rglob(TEMP_PREFIX + "*"):  # blobs/, manifests/, verified.json's
            with contextlib.suppress(OSError):
                if current - temp.stat().st_mtime > older_than_s:
                    temp.unlink()
                    count += 1
        return count
