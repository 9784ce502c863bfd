"""Argparse types for the numeric flags: a value out of range is refused at parse time.

``--grace nan``, ``--cache-gb inf`` or ``--parallel -3`` end the command with argparse's
usage line and one error line (exit 2) before anything is loaded; NaN and infinities are
never a valid setting, and each flag names the range that means something for it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[lo, hi]`` (either bound may be open-ended)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        _check_range(value, text, lo, hi, above=None)
        return value

    return parse


def integer_or(
    word: str, lo: int | None = None, hi: int | None = None
) -> Callable[[str], int | None]:
    """``word`` (read as ``None``) or a whole number in ``[lo, hi]``."""
    whole = integer(lo, hi)

    def parse(text: str) -> int | None:
        if text == word:
            return None
        try:
            return whole(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} or {word!r}") from None

    return parse


def number(
    lo: float | None = None, hi: float | None = None, *, above: float | None = None
) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]``, or greater than ``above``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        _check_range(value, text, lo, hi, above=above)
        return value

    return parse


def _check_range(
    value: float, text: str, lo: float | None, hi: float | None, *, above: float | None
) -> None:
    if above is not None and not value > above:
        raise argparse.ArgumentTypeError(f"must be > {_show(above)}, got {text!r}")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be in {_show(lo)}..{_show(hi)}, got {text!r}")
    if lo is not None and value < lo:
        raise argparse.ArgumentTypeError(f"must be >= {_show(lo)}, got {text!r}")
    if hi is not None and value > hi:
        raise argparse.ArgumentTypeError(f"must be <= {_show(hi)}, got {text!r}")


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
