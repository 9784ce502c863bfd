"""Per-sequence KV cache: one growable key/value buffer per attention layer.

A ``SequenceCache`` holds the keys and values of every position a sequence has computed so far.
Buffers grow in steps of ``STEP`` positions so that decode does not reallocate each token, and
``truncate`` only moves the offset (the data past it is dead and overwritten later). The
scheduler owns the map of these; the engine thread is the only one that touches their arrays.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

STEP = 256


class KVCache:
    """Keys and values of one attention layer for one sequence, shaped ``[1, H, T, D]``."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` (``[1, H, L, D]``) and return all valid positions."""
        prev = self.offset
        length = keys.shape[2]
        if self.keys is None or self.values is None or prev + length > self.keys.shape[2]:
            batch, heads, _, k_dim = keys.shape
            v_dim = values.shape[3]
            grow = ((length + STEP - 1) // STEP) * STEP
            new_k = mx.zeros((batch, heads, grow, k_dim), keys.dtype)
            new_v = mx.zeros((batch, heads, grow, v_dim), values.dtype)
            if self.keys is not None and self.values is not None:
                old_k, old_v = self.keys[..., :prev, :], self.values[..., :prev, :]
                self.keys = mx.concatenate([old_k, new_k], axis=2)
                self.values = mx.concatenate([old_v, new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset += length
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def truncate(self, length: int) -> None:
        """Forget every position at or after ``length``."""
        if length < 0:
            raise ValueError("length must be >= 0")
        self.offset = min(self.offset, length)
        if self.offset == 0:
            self.keys = self.values = None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def arrays(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class SequenceCache:
    """The caches of every layer of one sequence, always at the same offset between steps."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [KVCache() for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KVCache]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> KVCache:
        return self.layers[index]

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (prefix reuse, or undoing a partial step)."""
        for layer in self.layers:
            layer.truncate(length)

    def trim(self, count: int) -> int:
        """Drop the last ``count`` positions; return how many were dropped."""
        count = max(0, min(count, self.offset))
        self.truncate(self.offset - count)
        return count

    def clear(self) -> None:
        self.truncate(0)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers for a in layer.arrays]
