"""Sliding-window attention on either layout: a query at position ``p`` sees ``p - window < j <= p``.

Gemma 3 (five of every six layers), Mistral configs with ``sliding_window`` and Phi-3 attend
this way. The layouts (``SpanLayout`` here, the engine's ``BatchLayout``) attend to the whole
cache, so ``attend`` wraps them: while no query of the step is ``window`` or more positions
into its sequence, windowed and full attention are the same and the layout's own (faster) path
runs unchanged. Past that point:

- on a ``SpanLayout`` each span attends with a windowed causal mask;
- on a ``BatchLayout`` the decode rows go through the layout's own decode path with a windowed
  length mask in place of its mask (and MLX's attention in place of the GPU kernel), and each
  prefill chunk is written to its cache row and attended here with a windowed causal mask.

The cache keeps every position (no rotating buffer), so a prefix copied out of it or a
truncated sequence stays valid whatever the window.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx

from runtime.models.common import Layout, Rope, SpanLayout, merge_heads


def attend(
    layout: Layout,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    layer: int,
    rope: Rope,
    scale: float,
    window: int | None,
) -> mx.array:
    """``layout.attend``, each query seeing at most the last ``window`` positions (None: all)."""
    if window is None or _within(layout, layer, window):
        return layout.attend(queries, keys, values, layer=layer, rope=rope, scale=scale)
    if isinstance(layout, SpanLayout):
        return _spans(layout, queries, keys, values, layer=layer, rope=rope, scale=scale, w=window)
    return _batch(layout, queries, keys, values, layer=layer, rope=rope, scale=scale, w=window)


def _within(layout: Any, layer: int, window: int) -> bool:
    """Whether every query of the step sees at most ``window`` positions anyway."""
    if isinstance(layout, SpanLayout):
        return all(s.cache[layer].offset + s.length <= window for s in layout.spans)
    # BatchLayout: decode rows read [0, span); a prefill chunk ends at offset + length.
    return layout.span <= window and all(c.offset + c.length <= window for c in layout.prefill)


def first_seen(offset: int, window: int) -> int:
    """The first position the query at ``offset`` sees: keys before it need not be read."""
    return max(0, offset + 1 - window)


def causal_window_mask(offset: int, length: int, window: int) -> mx.array:
    """``[length, keys]``: query ``offset + i`` sees key ``first + j`` in its window, for the
    keys from ``first_seen(offset, window)`` to ``offset + length``."""
    queries = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(first_seen(offset, window), offset + length)[None]
    return (queries >= keys) & (queries < keys + window)


def _spans(
    layout: SpanLayout,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    layer: int,
    rope: Rope,
    scale: float,
    w: int,
) -> mx.array:
    outputs = []
    for span in layout.spans:
        end = span.start + span.length
        q = queries[:, :, span.start : end]
        k = keys[:, :, span.start : end]
        v = values[:, :, span.start : end]
        cache = span.cache[layer]
        offset = cache.offset
        q, k = rope(q, offset), rope(k, offset)
        k, v = cache.update_and_fetch(k, v)
        first = first_seen(offset, w)
        k, v = k[:, :, first:], v[:, :, first:]
        mask = causal_window_mask(offset, span.length, w)
        outputs.append(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    return merge_heads(out)


def _batch(
    layout: Any,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    layer: int,
    rope: Rope,
    scale: float,
    w: int,
) -> mx.array:
    cache, rows = layout.cache, layout.rows
    outputs = []
    if rows:
        q, k, v = queries, keys, values
        if layout.prefill:  # packed [1, H, N, D]: the decode rows as one batch entry each
            q, k, v = (a[:, :, :rows].transpose(2, 1, 0, 3) for a in (queries, keys, values))
        decode = attrs.evolve(
            layout, prefill=(), kernel=False, mask=_decode_mask(layout.offsets, layout.span, w)
        )
        out = decode.attend(q, k, v, layer=layer, rope=rope, scale=scale)  # [rows, 1, H * D]
        if not layout.prefill:  # the step's tokens came as [rows, 1]: so does its output
            return out
        outputs.append(out.reshape(1, rows, -1))
    else:
        cache.ensure(layer, layout.capacity_rows, layout.positions, keys, values)
    for chunk in layout.prefill:
        end, stop, row = chunk.start + chunk.length, chunk.offset + chunk.length, chunk.row
        q = rope(queries[:, :, chunk.start : end], chunk.offset)
        k = rope(keys[:, :, chunk.start : end], chunk.offset)
        k_all, v_all = cache.keys[layer], cache.values[layer]
        k_all[row : row + 1, :, chunk.offset : stop] = k
        v_all[row : row + 1, :, chunk.offset : stop] = values[:, :, chunk.start : end]
        cache.keys[layer], cache.values[layer] = k_all, v_all
        first = first_seen(chunk.offset, w)
        out = mx.fast.scaled_dot_product_attention(
            q,
            k_all[row : row + 1, :, first:stop],
            v_all[row : row + 1, :, first:stop],
            scale=scale,
            mask=causal_window_mask(chunk.offset, chunk.length, w),
        )
        outputs.append(merge_heads(out))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)


def _decode_mask(offsets: mx.array, span: int, window: int) -> mx.array:
    """``[rows, 1, 1, span]``: row ``r`` sees ``offsets[r] - window < j <= offsets[r]``.

    A row that is not decoding may be longer than ``span``; it still sees one position (its
    output is discarded), so no softmax row is all ``-inf``.
    """
    positions = mx.arange(span)[None, :]
    lowest = mx.minimum(offsets + 1 - window, span - 1)[:, None]
    visible = (positions <= offsets[:, None]) & (positions >= lowest)
    return visible.reshape(-1, 1, 1, span)
