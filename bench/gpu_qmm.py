"""4-bit matmuls at a decode step's row counts on the GPU, by the shape MLX is handed.

Builds the 32 layers of the random 8B-class llama's projections (fused Q/K/V, O, fused gate/up,
down) quantized to 4 bits in groups of 64, and times one pass through all of them with
``mx.quantized_matmul`` at 1 to 128 rows, with the input shaped three ways:

- ``[rows, 1, D]``: one token per sequence, as a decode step (and mlx-lm's batch) hands it;
- ``[rows, D]``: the same rows as one 2-D matrix;
- ``[rows, D]`` padded with zero rows to at least 8: what ``runtime.models.quantized_linear``
  does on CUDA.

Run: ``python bench/gpu_qmm.py`` (needs about 6 GB of device memory).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import mlx.core as mx

HIDDEN, INTERMEDIATE, LAYERS, KV = 4096, 14336, 32, 1024
SHAPES = [
    (HIDDEN + 2 * KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (2 * INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
]
Packed = tuple[mx.array, mx.array, mx.array]


def make_layers() -> list[list[Packed]]:
    layers = []
    for _ in range(LAYERS):
        packed = []
        for out_dims, in_dims in SHAPES:
            w = (mx.random.normal((out_dims, in_dims)) * 0.02).astype(mx.bfloat16)
            q = mx.quantize(w, group_size=64, bits=4)
            mx.eval(q)
            packed.append((q[0], q[1], q[2]))
        layers.append(packed)
    return layers


def qmm(x: mx.array, w: Packed) -> mx.array:
    return mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)


def per_token(x: mx.array, w: Packed) -> mx.array:
    return qmm(x[:, None, :], w)


def padded(x: mx.array, w: Packed) -> mx.array:
    rows = x.shape[0]
    if 1 < rows < 8:
        return qmm(mx.pad(x, [(0, 8 - rows), (0, 0)]), w)[:rows]
    return qmm(x, w)


def timed(
    fn: Callable[[mx.array, Packed], mx.array], layers: list[list[Packed]], rows: int
) -> float:
    xs = {n: mx.random.normal((rows, n)).astype(mx.bfloat16) for n in (HIDDEN, INTERMEDIATE)}

    def one_pass() -> list[mx.array]:
        return [fn(xs[int(w[2].shape[1]) * 64], w) for p in layers for w in p]

    mx.eval(one_pass())
    times = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(one_pass())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    layers = make_layers()
    print(f"{'rows':>5} {'[rows,1,D] ms':>14} {'[rows,D] ms':>12} {'padded ms':>10}")
    for rows in (1, 2, 3, 4, 8, 12, 16, 64, 128):
        cells = [timed(fn, layers, rows) for fn in (per_token, qmm, padded)]
        print(f"{rows:>5} {cells[0]:>14.2f} {cells[1]:>12.2f} {cells[2]:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
