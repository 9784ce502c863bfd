"""The choice between the GPU decode-attention kernel and MLX's attention, and the fallback.

The kernel itself needs MLX's CUDA backend (``bench/decode_attention.py`` checks it against
MLX's attention on the GPU); here, on the CPU, the layout's decisions and the fallback path are
checked: a layout that chose the kernel but gets no result from it must still attend correctly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from runtime.engine import batch_cache, decode_attention
from runtime.engine.batch_cache import BatchKVCache, BatchLayout
from runtime.models.common import Rope


def test_kernel_is_off_without_cuda() -> None:
    q = mx.zeros((2, 4, 1, 32))
    kv = mx.zeros((2, 2, 16, 32))
    assert not decode_attention.enabled()
    assert not decode_attention.supports(q, kv)


def test_kernel_takes_only_the_shapes_it_is_built_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    kv = mx.zeros((2, 8, 16, 128), dtype=mx.bfloat16)
    assert decode_attention.supports(mx.zeros((2, 32, 1, 128), dtype=mx.bfloat16), kv)
    assert not decode_attention.supports(mx.zeros((2, 32, 1, 128)), kv)  # dtypes differ
    assert not decode_attention.supports(mx.zeros((2, 32, 2, 128), dtype=mx.bfloat16), kv)
    assert not decode_attention.supports(mx.zeros((2, 30, 1, 128), dtype=mx.bfloat16), kv)
    narrow = mx.zeros((2, 2, 16, 80), dtype=mx.bfloat16)  # 80 features: not a warp's multiple
    assert not decode_attention.supports(mx.zeros((2, 4, 1, 80), dtype=mx.bfloat16), narrow)
    wide = mx.zeros((2, 1, 16, 256), dtype=mx.bfloat16)  # 16 queries of 256: too much shared memory
    assert not decode_attention.supports(mx.zeros((2, 16, 1, 256), dtype=mx.bfloat16), wide)


def test_env_forces_mlx_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    assert decode_attention.enabled()
    monkeypatch.setenv("MLXRUNNER_DECODE_ATTENTION", "sdpa")
    assert not decode_attention.enabled()


@pytest.mark.parametrize(
    ("rows", "kv_heads", "longest", "splits"),
    [
        (64, 8, 4000, 1),  # 512 blocks already fill the GPU
        (16, 8, 800, 3),  # 128 blocks: split in 3 (3 * 256 <= 800)
        (16, 8, 200, 1),  # too short to be worth a second kernel
        (1, 8, 4096, 16),  # one row, long: 16 slices of 256 positions
        (1, 8, 1, 1),
    ],
)
def test_splits_fill_the_gpu_without_short_slices(
    rows: int, kv_heads: int, longest: int, splits: int
) -> None:
    assert decode_attention.splits_for(rows, kv_heads, longest) == splits


def _layout(lengths: list[int], cache: BatchKVCache) -> BatchLayout:
    return BatchLayout.build(
        cache,
        capacity_rows=len(lengths),
        positions=256,
        lengths=lengths,
        decoding=list(range(len(lengths))),
        prefill=[],
    )


def test_layout_takes_the_kernel_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BatchKVCache(1)
    ragged = _layout([3, 7, 5], cache)
    assert not ragged.kernel  # CPU: MLX's attention with a mask
    assert ragged.mask is not None
    assert not _layout([5, 5], cache).ragged
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    assert _layout([3, 7, 5], cache).kernel  # ragged rows: the kernel, and no mask built
    assert _layout([3, 7, 5], cache).mask is None
    assert _layout([5], cache).kernel  # one short row too
    assert _layout([5, 5], cache).kernel
    monkeypatch.setenv("MLXRUNNER_DECODE_ATTENTION", "sdpa")
    assert not _layout([5, 5], cache).kernel


def test_a_kernel_that_declines_falls_back_to_masked_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same outputs whether the layout chose MLX's attention or chose the kernel and it
    declined (head sizes it does not take): the fallback rotates and writes the decode rows,
    and builds the length mask itself."""
    rope = Rope(32, base=10000.0)
    mx.random.seed(3)
    q = mx.random.normal((3, 4, 1, 32))
    k = mx.random.normal((3, 2, 1, 32))
    v = mx.random.normal((3, 2, 1, 32))
    lengths = [3, 7, 5]

    def run() -> np.ndarray:
        cache = BatchKVCache(1)
        prefill = mx.random.normal((3, 2, 256, 32), key=mx.random.key(1))
        cache.keys[0], cache.values[0] = prefill, prefill * 0.5
        out = _layout(lengths, cache).attend(q, k, v, layer=0, rope=rope, scale=0.2)
        return np.array(out)

    expected = run()
    monkeypatch.setattr(decode_attention, "_cuda_gpu", lambda: True)
    calls: list[int] = []

    def declines(*args: object, **kwargs: object) -> bool:
        calls.append(1)
        return False

    monkeypatch.setattr(batch_cache.decode_attention, "supports", declines)
    np.testing.assert_allclose(run(), expected, rtol=1e-6)
    assert calls  # the kernel was asked, and declined
