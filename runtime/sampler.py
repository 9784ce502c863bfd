"""Sampling options and the per-sequence sampler.

(SamplingOptions is final; the Sampler class lands with the sampler work.)
"""

from __future__ import annotations

import attrs

from runtime.errors import OptionsError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionsError(message)


@attrs.frozen(kw_only=True)
class SamplingOptions:
    """Ollama's option names and defaults. ``temperature == 0`` means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        _check(0 < self.typical_p <= 1, "typical_p must be in (0, 1]")
        _check(self.repeat_penalty > 0, "repeat_penalty must be > 0")
        _check(self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: the whole context)")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")
