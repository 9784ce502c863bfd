"""Which blobs a load has already hashed: a blob's sha256 is checked at its first load, then
again only when its file has changed.

Hashing costs about a second per GB here (a 4.5 GB 8B model would add ~4 s to every start,
as much as the load itself). Ollama checks digests when it pulls a blob and never at load;
checking sizes alone would miss a blob damaged in place. So ``Store.resolve`` hashes a blob
the first time and records, in ``<root>/verified.json``, the ``stat`` it had then: size,
mtime and ctime in nanoseconds, inode and device. A blob whose ``stat`` still matches is not
hashed again. Anything that changes a file through the file system (a write, a truncation, a
copy or restore over it) changes its ctime, size or inode, and the next load hashes it
again. Damage below the file system (a disk returning other bytes) is not seen; catching that
is the file system's job (checksums, scrubbing). Deleting ``verified.json`` makes the next
load hash every blob.

Timestamps move in kernel ticks, so a write in the same tick as the hashing could leave the
``stat`` unchanged. As git does with its index, a blob changed less than ``RACY_SECONDS``
before its hashing started is not recorded; it is hashed again at the next load.

The file is only a cache: unreadable or malformed, it is empty; it is written best-effort
(temp file, rename: a read-only store is hashed at every load), and two loads writing it at
once can at worst lose each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

FILE_NAME = "verified.json"
RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def now() -> float:
    """The wall clock; one name for the tests to move it."""
    return time.time()


class VerifiedBlobs:
    """The record of hashed blobs for one ``resolve``: read once, saved once at the end."""

    def __init__(self, root: Path) -> None:
        self.path = root / FILE_NAME
        self._entries = self._read()
        self._changed = False

    def _read(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):  # absent, unreadable, not JSON: an empty cache
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, list)}

    def known(self, digest: str, st: os.stat_result) -> bool:
        """Whether the blob was hashed before and its file has not changed since."""
        return self._entries.get(digest) == _signature(st)

    def record(self, digest: str, path: Path, before: os.stat_result, started: float) -> None:
        """The blob hashed right; ``before`` is its ``stat``, taken with ``now()`` in
        ``started``, both before hashing began."""
        if started - before.st_ctime_ns / 1e9 < RACY_SECONDS:
            return  # changed too recently to trust its timestamps: hash again next time
        with contextlib.suppress(OSError):
            if _signature(path.stat()) == _signature(before):  # unchanged while hashed
                self._entries[digest] = _signature(before)
                self._changed = True

    def save(self) -> None:
        """Write the record if it changed, keeping the entries of blobs that still exist."""
        if not self._changed:
            return
        blobs = self.path.parent / "blobs"
        entries = {
            digest: sig
            for digest, sig in self._entries.items()
            if (blobs / digest.replace(":", "-")).exists()
        }
        with contextlib.suppress(OSError):
            # The store's temp prefix: ``Store.remove_stale_temps`` finds it after a crash.
            fd, temp = tempfile.mkstemp(prefix=".partial-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(entries, f, indent=0, sort_keys=True)
                os.replace(temp, self.path)
            finally:
                Path(temp).unlink(missing_ok=True)
