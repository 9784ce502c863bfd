"""The engine's KV cache: one padded ``[rows, H, T, D]`` buffer per layer, and the step layout.

Every running sequence owns one *row* of the batch cache; its positions ``0..length-1`` are
valid and the rest of the row is padding. A decode step therefore needs one attention call per
layer for all rows at once (``mx.fast.scaled_dot_product_attention`` over the whole buffer with
a per-row length mask), and one scatter per layer to write each row's new key at its own
position; on the GPU one kernel call does both (``runtime.engine.decode_attention``). Prefill
chunks write a slice of their row and attend to it with a causal mask.

Capacity grows in steps (rows one at a time, positions ``STEP`` at a time) and only shrinks
when the batch empties: growing copies the buffer, so it must be rare, and the scheduler's
memory accounting (``runtime.scheduling.policy``) charges the capacity, not the lengths.

``BatchLayout`` is the ``Layout`` (``runtime.models.common``) of one engine step: the first
``rows`` tokens of the packed row are one decode token per cache row (rows that are not
decoding carry a dummy token whose output is discarded), followed by prefill chunks. A step
with no prefill chunk (the common case) comes flat instead: ``[rows]`` tokens, ``[rows, D]``
activations and ``[rows, H, 1, D]`` heads, one batch entry per row. On the GPU such a step is
bound by the host's time per MLX node, and the flat form has no transposes, and no flatten
and unflatten around each matmul. All cache writes of a layer happen before its attention
reads, so MLX can update the buffers in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import mlx.core as mx

from runtime.engine import decode_attention
from runtime.models import fused
from runtime.models.common import merge_heads
from runtime.models.sliding import causal_window_mask, decode_window_mask, first_seen

if TYPE_CHECKING:
    from runtime.models.common import Rope

STEP = 256


def round_up(length: int, step: int = STEP) -> int:
    return max(step, -(-length // step) * step)


class BatchKVCache:
    """Keys and values of every layer for every row (engine thread only)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers

    def ensure(
        self, layer: int, rows: int, positions: int, like_k: mx.array, like_v: mx.array
    ) -> None:
        """Make layer ``layer`` at least ``rows`` x ``positions``, shaped like ``like_*``."""
        keys, values = self.keys[layer], self.values[layer]
        heads, k_dim = like_k.shape[1], like_k.shape[3]
        v_dim = like_v.shape[3]
        if keys is None or values is None:
            self.keys[layer] = mx.zeros((rows, heads, positions, k_dim), like_k.dtype)
            self.values[layer] = mx.zeros((rows, heads, positions, v_dim), like_v.dtype)
            return
        have_rows, _, have_pos, _ = keys.shape
        if have_rows >= rows and have_pos >= positions:
            return
        new_rows, new_pos = max(rows, have_rows), max(positions, have_pos)
        new_k = mx.zeros((new_rows, heads, new_pos, k_dim), keys.dtype)
        new_v = mx.zeros((new_rows, heads, new_pos, v_dim), values.dtype)
        new_k[:have_rows, :, :have_pos] = keys
        new_v[:have_rows, :, :have_pos] = values
        self.keys[layer], self.values[layer] = new_k, new_v

    def clear(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values) if a is not None)

    @property
    def arrays(self) -> list[mx.array]:
        return [a for a in (*self.keys, *self.values) if a is not None]

    def copy_out(self, row: int, length: int) -> list[tuple[mx.array, mx.array]]:
        """A copy of the first ``length`` positions of ``row``, per layer (for the prefix cache)."""
        out = []
        for keys, values in zip(self.keys, self.values, strict=True):
            assert keys is not None
            assert values is not None
            # ``contiguous`` makes a compact copy: a slice would pin the whole batch buffer.
            out.append(
                (
                    mx.contiguous(keys[row : row + 1, :, :length]),
                    mx.contiguous(values[row : row + 1, :, :length]),
                )
            )
        return out

    def copy_in(self, row: int, prefix: Sequence[tuple[mx.array, mx.array]], length: int) -> None:
        """Write the first ``length`` positions of a saved prefix into ``row`` (capacity ready)."""
        for layer, (k, v) in enumerate(prefix):
            keys, values = self.keys[layer], self.values[layer]
            assert keys is not None
            assert values is not None
            keys[row : row + 1, :, :length] = k[:, :, :length]  # updates the array in the list
            values[row : row + 1, :, :length] = v[:, :, :length]


@attrs.frozen(kw_only=True)
class PrefillChunk:
    """``length`` prompt tokens at ``start`` in the packed row, for cache ``row`` at ``offset``."""

    start: int
    length: int
    row: int
    offset: int


@attrs.frozen(kw_only=True, eq=False)
class BatchLayout:
    """One engine step on the batch cache (see the module docstring)."""

    cache: BatchKVCache
    capacity_rows: int  # the cache's shape for this step (it grows to it on first use)
    positions: int
    rows: int  # decode tokens at the head of the packed row: 0, or one per cache row
    offsets: mx.array | None  # [rows] int32: each row's write position (= its length)
    span: int = 0  # decode attention reads positions [0, span) of every row
    ragged: bool = False  # decoding rows differ in length (MLX's attention needs a mask)
    kernel: bool = False  # decode rows attend with ``decode_attention`` (GPU), not MLX's
    # With the kernel: ``offsets`` where a row decodes, -1 where it does not (the kernel
    # writes and reads nothing there; MLX's path writes a dummy, which a prompt chunk of the
    # same step then overwrites).
    reads: mx.array | None = None
    mask: mx.array | None = None  # ``length_mask()`` when ragged and MLX's attention is used
    prefill: tuple[PrefillChunk, ...] = ()
    _write_indices: dict[tuple[int, ...], mx.array] = attrs.field(factory=dict, init=False)
    _window_masks: dict[int, mx.array] = attrs.field(factory=dict, init=False)
    # Layers that chose the kernel but whose shapes it does not take (they used MLX's masked
    # attention, whose graph depends on the span: ``CompiledDecode`` must not replay them).
    declined: list[int] = attrs.field(factory=list, init=False)

    @classmethod
    def build(
        cls,
        cache: BatchKVCache,
        *,
        capacity_rows: int,
        positions: int,
        lengths: Sequence[int] | None,
        decoding: Sequence[int] = (),
        prefill: Sequence[PrefillChunk],
    ) -> BatchLayout:
        """``lengths``: every row's length when the step decodes (``None``: prefill only);
        ``decoding``: the rows whose decode output is used (the others carry dummies)."""
        offsets = reads = None
        rows = span = 0
        ragged = kernel = False
        if lengths is not None:
            rows = capacity_rows
            assert len(lengths) == rows
            offsets = mx.array(list(lengths), dtype=mx.int32)
            used = [lengths[r] for r in decoding] or [0]
            # Attention reads only up to the longest used row (and the position it writes
            # now). When every used row has that length, no mask is needed at all: a masked
            # attention costs 2-3x an unmasked one on the GPU (bench/profile_step.py), and
            # rows that start together stay in step. Dummy rows' outputs are discarded.
            span = max(used) + 1
            ragged = min(used) != max(used)
            # The GPU kernel reads each row to its own length without a mask, and rotates
            # and writes the new keys itself: a layer's decode attention is one node instead
            # of five (two RoPEs, two scatters, attention). MLX's attention used to be faster
            # for one to three short rows, but no longer beside those nodes: batch-1 steps of
            # the 8B model took 4.82 ms through the kernel against 4.97 (README, GPU).
            kernel = decode_attention.enabled()
            if kernel:
                fed = set(decoding)
                reads = offsets
                if len(fed) < rows:
                    reads = mx.array(
                        [n if r in fed else -1 for r, n in enumerate(lengths)], dtype=mx.int32
                    )
        layout = cls(
            cache=cache,
            capacity_rows=capacity_rows,
            rows=rows,
            positions=positions,
            offsets=offsets,
            span=span,
            ragged=ragged,
            kernel=kernel,
            reads=reads,
            prefill=tuple(prefill),
        )
        if ragged and not kernel:
            layout = attrs.evolve(layout, mask=layout.length_mask())
        return layout

    def length_mask(self) -> mx.array | None:
        """``[rows, 1, 1, span]``: which positions each decode row sees (None: all of them)."""
        if not self.ragged:
            return None
        assert self.offsets is not None
        # Padding rows (length 0) still see one position: no softmax row is all -inf.
        visible = mx.arange(self.span)[None, :] <= self.offsets[:, None]
        return visible.reshape(self.rows, 1, 1, self.span)

    def _window_mask(self, window: int) -> mx.array:
        """``decode_window_mask`` of this step (built once per step and window)."""
        mask = self._window_masks.get(window)
        if mask is None:
            assert self.offsets is not None
            mask = self._window_masks[window] = decode_window_mask(self.offsets, self.span, window)
        return mask

    def _write_index(self, like: mx.array) -> mx.array:
        """Each decode row's write position, broadcast to ``like`` (built once per step and
        shape: every layer scatters at the same positions)."""
        index = self._write_indices.get(like.shape)
        if index is None:
            assert self.offsets is not None
            at = self.offsets.reshape(self.rows, 1, 1, 1)
            index = self._write_indices[like.shape] = mx.broadcast_to(at, like.shape)
        return index

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        layer: int,
        rope: Rope,
        scale: float,
        window: int | None = None,
    ) -> mx.array:
        rows = self.rows
        cache = self.cache
        cache.ensure(layer, self.capacity_rows, self.positions, keys, values)
        k_all, v_all = cache.keys[layer], cache.values[layer]
        assert k_all is not None
        assert v_all is not None
        decode_only = rows > 0 and not self.prefill
        kernel = False
        if rows:
            assert self.offsets is not None
            if decode_only:  # a flat step: already one batch entry per row
                q_dec, k_dec, v_dec = queries, keys, values
            else:  # [1, H, rows, D] -> [rows, H, 1, D]
                q_dec = queries[:, :, :rows].transpose(2, 1, 0, 3)
                k_dec = keys[:, :, :rows].transpose(2, 1, 0, 3)
                v_dec = values[:, :, :rows].transpose(2, 1, 0, 3)
            # Past the window, MLX's attention with a windowed length mask: the kernel reads
            # each row from position 0.
            windowed = window is not None and self.span > window
            kernel = self.kernel and not windowed and decode_attention.supports(q_dec, k_all)
            if self.kernel and not windowed and not kernel:
                self.declined.append(layer)
            if not kernel:  # (the kernel rotates and writes the decode rows itself)
                q_dec = rope(q_dec, self.offsets)
                k_dec = rope(k_dec, self.offsets)
                k_all = mx.put_along_axis(k_all, self._write_index(k_dec), k_dec, axis=2)
                v_all = mx.put_along_axis(v_all, self._write_index(v_dec), v_dec, axis=2)
        chunks = []
        for chunk in self.prefill:
            end = chunk.start + chunk.length
            q = rope(queries[:, :, chunk.start : end], chunk.offset)
            k = rope(keys[:, :, chunk.start : end], chunk.offset)
            row, stop = chunk.row, chunk.offset + chunk.length
            k_all[row : row + 1, :, chunk.offset : stop] = k
            v_all[row : row + 1, :, chunk.offset : stop] = values[:, :, chunk.start : end]
            chunks.append((q, row, chunk.offset, stop))
        if kernel:
            # After the prefill writes: rows that do not decode (a prompt being read among
            # them) have no position in ``reads`` and are left alone.
            assert self.reads is not None
            out, k_all, v_all = decode_attention.decode_attention(
                q_dec,
                k_dec,
                v_dec,
                k_all,
                v_all,
                self.reads,
                rope=rope,
                scale=scale,
                longest=self.span,
            )
        cache.keys[layer], cache.values[layer] = k_all, v_all
        outputs = []
        if rows:
            if not kernel:
                k_seen, v_seen = k_all, v_all
                if self.span < k_all.shape[2]:
                    k_seen, v_seen = k_all[:, :, : self.span], v_all[:, :, : self.span]
                mask: mx.array | None
                if windowed:
                    assert window is not None
                    mask = self._window_mask(window)
                else:
                    mask = self.mask if self.mask is not None else self.length_mask()
                out = fused.attention(q_dec, k_seen, v_seen, scale=scale, mask=mask)
            if decode_only:
                # [rows, H, 1, D] -> [rows, H * D]: the transpose in ``merge_heads`` would move
                # an axis of size 1, so a reshape is the same order, and a view when contiguous.
                return out.reshape(out.shape[0], -1)
            outputs.append(out.transpose(2, 1, 0, 3))  # back to [1, H, rows, D]
        for q, row, offset, stop in chunks:
            first = 0
            chunk_mask: str | mx.array | None = "causal" if q.shape[2] > 1 else None
            if window is not None and stop > window:
                first = first_seen(offset, window)
                chunk_mask = causal_window_mask(offset, stop - offset, window)
            k = k_all[row : row + 1, :, first:stop]
            v = v_all[row : row + 1, :, first:stop]
            if isinstance(chunk_mask, mx.array):  # a sliding window's
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=chunk_mask)
            else:
                out = fused.causal_attention(q, k, v, scale=scale)
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
        return merge_heads(out)
