"""Sampling options: Ollama's names, defaults and checks (MLX-free, so request schemas and actor
messages import without MLX).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> SamplingOptions:
        """See ``options_from_dict``."""
        return options_from_dict(options)

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


_FIELDS = tuple(f.name for f in attrs.fields(SamplingOptions))
_INT_FIELDS = frozenset({"top_k", "repeat_last_n", "seed"})


def _coerce(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionsError(f"option {name!r} must be a number, got {type(value).__name__}")
    if name in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise OptionsError(f"option {name!r} must be an integer, got {value}")
        return int(value)
    try:
        number = float(value)
    except OverflowError:
        raise OptionsError(f"option {name!r} is out of range") from None
    if not math.isfinite(number):
        raise OptionsError(f"option {name!r} must be finite")
    return number


def options_from_dict(options: Mapping[str, Any]) -> SamplingOptions:
    """Sampling options from Ollama-named keys; other keys (num_predict, stop...) are ignored.

    ``None`` means the default; a negative ``seed`` means unseeded.
    """
    if not isinstance(options, Mapping):
        raise OptionsError(f"options must be an object, got {type(options).__name__}")
    values: dict[str, Any] = {}
    for name in _FIELDS:
        value = options.get(name)
        if value is None:
            continue
        values[name] = _coerce(name, value)
    if values.get("seed", 0) < 0:
        values["seed"] = None
    return SamplingOptions(**values)
