"""Progress of long store operations (import, load) as records, and a way to show them.

Work reports records to a plain callback; whoever started it decides what to do with them: the
importer and the source reader report ``Progress``, a load reports the loader's
``LoadProgress`` (same fields, a fraction that leaves room for building the model), the
loader actor keeps the latest fraction for ``/health`` and the command line draws a bar.
``ProgressBar`` redraws one terminal line when the stream is a TTY and otherwise writes a plain
log line at each phase change and every quarter, so logs stay short and greppable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol, TextIO

import attrs


@attrs.frozen(kw_only=True)
class Progress:
    """Where an import or load is: bytes and tensors done out of the totals."""

    phase: str  # importer: "read", "write", "done"; loader: "read", "build", "ready"
    done_bytes: int = 0
    total_bytes: int = 0
    done_items: int = 0
    total_items: int = 0

    @property
    def fraction(self) -> float:
        if self.phase in ("done", "ready"):
            return 1.0
        if self.total_bytes > 0:
            return min(1.0, self.done_bytes / self.total_bytes)
        if self.total_items > 0:
            return min(1.0, self.done_items / self.total_items)
        return 0.0


ProgressCallback = Callable[[Progress], None]


class ProgressLike(Protocol):
    """What ``ProgressBar`` reads: a ``Progress`` or the loader's ``LoadProgress``."""

    @property
    def phase(self) -> str: ...
    @property
    def done_bytes(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def fraction(self) -> float: ...


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class ProgressBar:
    """A callback drawing ``label [#####.....]  42% 12.3 MB/29.0 MB 40/272 tensors``."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, tty: bool | None = None, width: int = 30
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self._last_phase = ""
        self._last_step = -1  # percent on a TTY, quarter otherwise
        self._open_line = False

    def _detail(self, p: ProgressLike) -> str:
        parts = [f"{p.fraction * 100:3.0f}%"]
        if p.total_bytes:
            parts.append(f"{human_bytes(p.done_bytes)}/{human_bytes(p.total_bytes)}")
        total_items = getattr(p, "total_items", 0)
        if total_items:
            parts.append(f"{getattr(p, 'done_items', 0)}/{total_items} tensors")
        return " ".join(parts)

    def __call__(self, p: ProgressLike) -> None:
        fraction = max(0.0, min(1.0, p.fraction))
        finished = fraction >= 1.0
        step = int(fraction * (100 if self.tty else 4))
        if p.phase == self._last_phase and step == self._last_step:
            return
        self._last_phase, self._last_step = p.phase, step
        if self.tty:
            filled = int(fraction * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            phase = f" {p.phase:<6}" if p.phase else ""  # a pull's blob has no phases
            self.stream.write(f"\r{self.label}{phase} [{bar}] {self._detail(p)}\x1b[K")
            self._open_line = not finished
            if finished:
                self.stream.write("\n")
        else:
            phase = f" {p.phase}" if p.phase else ""
            self.stream.write(f"{self.label}:{phase} {self._detail(p)}\n")
        self.stream.flush()

    def close(self) -> None:
        """End an unfinished bar's line (an error message must not land on it)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
