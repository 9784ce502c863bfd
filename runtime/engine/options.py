"""Sampling options: Ollama's names, defaults and checks (MLX-free, so request schemas and actor
messages import without MLX).

The checks keep every option a value the sampler can use as it is, in float32 on the device:
nan and infinities are refused, and so is a float that overflows float32. Beyond Ollama's own
ranges three limits are this server's:

- a temperature below ``GREEDY_TEMPERATURE`` (1e-5) means greedy: dividing logits by it would
  only turn them into infinities (and a float32 zero into nan);
- ``repeat_penalty`` must be >= ``MIN_REPEAT_PENALTY`` (0.01): a penalty is a divisor of the
  logits of recent tokens, and a smaller one overflows them to infinity (and 0 or below
  inverts them);
- ``top_p`` and ``typical_p`` must be >= ``MIN_TOP_P`` (1e-9): any smaller positive value keeps
  only the likeliest token, as 1e-9 does, but a float32 rounds it to 0, which keeps none.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import attrs

from runtime.errors import OptionsError

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is the argmax
MIN_REPEAT_PENALTY = 0.01
MIN_TOP_P = 1e-9  # also typical_p's floor


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise OptionsError(message)


@attrs.frozen(kw_only=True)
class SamplingOptions:
    """Ollama's option names and defaults. A temperature below ``GREEDY_TEMPERATURE`` (0
    included) means greedy."""

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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def __attrs_post_init__(self) -> None:
        for name in _FLOAT_FIELDS:
            _check_float32(name, getattr(self, name))
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        _check(MIN_TOP_P <= self.top_p <= 1, f"top_p must be in [{MIN_TOP_P}, 1]")
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        _check(MIN_TOP_P <= self.typical_p <= 1, f"typical_p must be in [{MIN_TOP_P}, 1]")
        _check(
            self.repeat_penalty >= MIN_REPEAT_PENALTY,
            f"repeat_penalty must be >= {MIN_REPEAT_PENALTY} (1 disables it)",
        )
        _check(self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: the whole context)")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")


_FIELDS = tuple(f.name for f in attrs.fields(SamplingOptions))
_INT_FIELDS = frozenset({"top_k", "repeat_last_n", "seed"})
_FLOAT_FIELDS = tuple(name for name in _FIELDS if name not in _INT_FIELDS)


def _check_float32(name: str, value: float) -> None:
    """``value`` is a number the sampler's float32 arrays hold as a finite number."""
    _check(math.isfinite(value), f"option {name!r} must be finite")
    try:
        struct.pack("<f", value)
    except OverflowError:
        raise OptionsError(f"option {name!r} is out of range") from None


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
