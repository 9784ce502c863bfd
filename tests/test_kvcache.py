"""SequenceCache growth, truncation and accounting."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from runtime.engine.kvcache import STEP, SequenceCache


def _kv(n: int, start: int = 0) -> tuple[mx.array, mx.array]:
    k = mx.arange(start, start + n, dtype=mx.float32).reshape(1, 1, n, 1) * mx.ones((1, 2, n, 4))
    return k, -k


def test_update_grows_in_steps_and_returns_valid_positions() -> None:
    cache = SequenceCache(2)
    k, v = cache[0].update_and_fetch(*_kv(3))
    assert k.shape == (1, 2, 3, 4)
    assert cache[0].keys is not None
    assert cache[0].keys.shape[2] == STEP
    k, v = cache[0].update_and_fetch(*_kv(STEP, start=3))
    assert k.shape[2] == STEP + 3
    assert cache[0].keys.shape[2] >= STEP + 3
    assert np.array_equal(np.array(k[0, 0, :, 0]), np.arange(STEP + 3))
    assert np.array_equal(np.array(v), -np.array(k))


def test_truncate_and_trim_move_the_offset_and_overwrite() -> None:
    cache = SequenceCache(1)
    cache[0].update_and_fetch(*_kv(10))
    assert cache.trim(4) == 4
    assert cache.offset == 6
    k, _ = cache[0].update_and_fetch(*_kv(2, start=100))
    assert np.array_equal(np.array(k[0, 0, :, 0]), [0, 1, 2, 3, 4, 5, 100, 101])
    assert cache.trim(50) == 8
    assert cache.offset == 0
    assert cache.nbytes == 0  # emptied caches release their buffers


def test_nbytes_counts_every_layer() -> None:
    cache = SequenceCache(3)
    for layer in cache:
        layer.update_and_fetch(*_kv(5))
    assert cache.nbytes == 3 * 2 * (2 * STEP * 4 * 4)
    cache.clear()
    assert cache.nbytes == 0
