"""Sliding-window attention's masks: a query at position ``p`` sees ``p - window < j <= p``.

Gemma 3 (five of every six layers), Mistral configs with ``sliding_window`` and Phi-3 attend
this way: their layers pass ``window`` to ``Layout.attend``, and both layouts (``SpanLayout``
in ``runtime.models.common``, the engine's ``BatchLayout``) use these masks where a query is
``window`` or more positions into its sequence; before that, windowed and full attention are
the same and the layout's own (faster) path runs unchanged.

The cache keeps every position (no rotating buffer), so a prefix copied out of it or a
truncated sequence stays valid whatever the window.
"""

from __future__ import annotations

import mlx.core as mx


def first_seen(offset: int, window: int) -> int:
    """The first position the query at ``offset`` sees: keys before it need not be read."""
    return max(0, offset + 1 - window)


def causal_window_mask(offset: int, length: int, window: int) -> mx.array:
    """``[length, keys]``: query ``offset + i`` sees key ``first + j`` in its window, for the
    keys from ``first_seen(offset, window)`` to ``offset + length``."""
    queries = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(first_seen(offset, window), offset + length)[None]
    return (queries >= keys) & (queries < keys + window)


def decode_window_mask(offsets: mx.array, span: int, window: int) -> mx.array:
    """``[rows, 1, 1, span]``: decode row ``r`` sees ``offsets[r] - window < j <= offsets[r]``.

    A row that is not decoding may be longer than ``span``; it still sees one position (its
    output is discarded), so no softmax row is all ``-inf``.
    """
    positions = mx.arange(span)[None, :]
    lowest = mx.minimum(offsets + 1 - window, span - 1)[:, None]
    visible = (positions <= offsets[:, None]) & (positions >= lowest)
    return visible.reshape(-1, 1, 1, span)
