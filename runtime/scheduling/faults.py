"""When an engine fault stays local and when it takes the server down; what counts as out of
memory.

A failed engine step fails the sequences that step was computing and nothing else (the
scheduler drops them and goes on, ``Engine.abort_step``). That is right for a fault that
happens once: an allocation that did not fit, a request that hit a bug. A fault that keeps
coming back means the engine itself is broken, and a server that answers every request with an
error while looking alive is worse than one that exits and is restarted. ``FaultRule`` says
where that line is, counted in engine steps (never in wall time: a busy server and an idle one
judge the same run of outcomes the same way, and tests need no clock):

- ``consecutive`` failed steps with no successful step between them, or
- ``in_window`` failed steps among the last ``window`` steps (a fault that keeps flapping).

An engine admission that fails with a fault (not an input error) counts as a failed step.
``FaultTracker`` applies the rule to the outcomes the scheduler reports, in order.
"""

from __future__ import annotations

from collections import deque

import attrs


@attrs.frozen(kw_only=True)
class FaultRule:
    consecutive: int = 3
    in_window: int = 10
    window: int = 1000

    def __attrs_post_init__(self) -> None:
        if self.consecutive < 1 or self.in_window < 1:
            raise ValueError("consecutive and in_window must be >= 1")
        if self.window < self.in_window:
            raise ValueError("window must be >= in_window")


class FaultTracker:
    """The outcomes of engine steps, in order, judged by a ``FaultRule``."""

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.steps = 0  # steps judged so far, failed or not
        self.failures = 0  # failed steps so far
        self._streak = 0  # failed steps since the last successful one
        self._recent: deque[int] = deque()  # step numbers of the failures in the window

    def succeeded(self, steps: int = 1) -> None:
        """``steps`` steps succeeded."""
        if steps > 0:
            self.steps += steps
            self._streak = 0

    def failed(self) -> str | None:
        """One step failed; returns why the server must stop, or None while it may go on."""
        self.steps += 1
        self.failures += 1
        self._streak += 1
        self._recent.append(self.steps)
        while self._recent[0] <= self.steps - self.rule.window:
            self._recent.popleft()
        if self._streak >= self.rule.consecutive:
            return f"{self._streak} failed engine steps in a row"
        if len(self._recent) >= self.rule.in_window:
            return f"{len(self._recent)} failed engine steps within {self.rule.window} steps"
        return None


# What MLX's allocators and the CUDA runtime say when an allocation fails: "[malloc] Unable
# to allocate N bytes", "[metal::malloc] Attempting to allocate N bytes which is greater than
# the maximum allowed buffer size", "[cuda] ... out of memory".
_OUT_OF_MEMORY_MARKS = ("malloc", "unable to allocate", "attempting to allocate", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (the request may succeed when retried)."""
    if isinstance(error, MemoryError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return any(mark in message for mark in _OUT_OF_MEMORY_MARKS)
