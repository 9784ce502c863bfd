"""Shared helpers for the benchmarks: the default model's files and timers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def default_gguf() -> Path:
    """The default model's GGUF (``scripts.prepare_default_model.find_gguf``), or exit saying
    how to install it."""
    from runtime.errors import ModelNotFoundError
    from scripts.prepare_default_model import find_gguf

    try:
        return find_gguf()
    except ModelNotFoundError as exc:
        raise SystemExit(f"{exc} (or run `make install`)") from None


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


BENCH_TEXT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who repaired the watches of everyone in the valley. Each morning he opened his "
    "shutters, lit a small stove, and laid out his tools in the same careful order: tweezers, "
    "loupe, screwdrivers no thicker than a hair, and a tin of oil that smelled faintly of "
    "almonds. Children gathered at his window to watch the tiny gears turn, and he would hold "
    "up a spring to the light and explain how a single coil could keep time for a hundred years "
    "if it was treated with patience. One winter, a stranger arrived with a clock that had no "
    "hands and no numbers, only a face of polished black stone that seemed to swallow the light."
)


def per_call_ms(fn: Callable[[], object], *, repeats: int = 10, calls: int = 32) -> float:
    """Milliseconds per call of an MLX function, calls issued ``calls`` at a time and evaluated
    together, as a decode step issues one per layer (one warm-up call first)."""
    import mlx.core as mx

    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval([fn() for _ in range(calls)])
    return (time.perf_counter() - start) / (repeats * calls) * 1000
