"""The host's cost per MLX operation on the GPU, by kind: why a decode step is host-bound.

Each kind runs as a chain of ``N`` tiny operations (each one's input is the previous one's
output, so the device work is negligible) and the time is split into building the graph in
Python and evaluating it (MLX encodes and launches each kernel; in its default CUDA-graph mode
it adds each to a graph). Per operation, in microseconds. Compare the kinds: a decode step of
a 32-layer model runs several hundred such operations, so their host cost, not the device,
sets the step time at 16 rows and more. Run with ``MLX_USE_CUDA_GRAPHS=0`` to see MLX's
direct-launch mode.

Run: ``python bench/gpu_ops.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from runtime.engine import decode_attention
from runtime.models.common import Rope

N = 400


def bench(name: str, make: Callable[[], mx.array]) -> None:
    for _ in range(2):
        mx.eval(make())
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        out = make()
        built = time.perf_counter()
        mx.eval(out)
        runs.append(((built - start) / N * 1e6, (time.perf_counter() - built) / N * 1e6))
    build, evaluate = sorted(runs, key=sum)[2]
    print(f"{name:>28}: build {build:6.1f} us  eval {evaluate:6.1f} us", flush=True)


def chain(x: mx.array, op: Callable[[mx.array], mx.array]) -> Callable[[], mx.array]:
    def make() -> mx.array:
        y = x
        for _ in range(N):
            y = op(y)
        return y

    return make


def main() -> None:
    bf = mx.bfloat16
    x1, x16, x64 = (mx.random.normal((n, 256)).astype(bf) for n in (1, 16, 64))
    w = mx.random.normal((256, 256)).astype(bf)
    norm = mx.ones((256,), bf)
    q = mx.random.normal((16, 32, 1, 128)).astype(bf)
    offsets = mx.arange(16, dtype=mx.int32) + 100
    cache = mx.zeros((16, 8, 256, 128), bf)
    new_k = mx.random.normal((16, 8, 1, 128)).astype(bf)
    at = mx.broadcast_to(offsets.reshape(16, 1, 1, 1), new_k.shape)
    k = mx.random.normal((16, 8, 256, 128)).astype(bf)
    lengths = mx.full((16,), 150, dtype=mx.int32)
    mx.eval(x1, x16, x64, w, norm, q, offsets, cache, new_k, at, k, lengths)
    print(f"per operation, chains of {N}, device {mx.default_device()}")
    bench("matmul, 1 row (gemv)", chain(x1, lambda y: y @ w.T))
    bench("matmul, 16 rows (cuBLAS)", chain(x16, lambda y: y @ w.T))
    bench("matmul, 64 rows (cuBLAS)", chain(x64, lambda y: y @ w.T))
    bench("add", chain(x16, lambda y: y + 1))
    bench("rms_norm", chain(x16, lambda y: mx.fast.rms_norm(y, norm, 1e-5)))
    bench(
        "rope, array offsets",
        chain(
            q,
            lambda y: mx.fast.rope(y, 128, traditional=False, base=5e5, scale=1.0, offset=offsets),
        ),
    )
    bench("put_along_axis", chain(cache, lambda c: mx.put_along_axis(c, at, new_k, axis=2)))

    rope = Rope(128, base=5e5)
    v = k * 1  # the kernel writes the new position of both caches

    def attend(y: mx.array) -> mx.array:
        out, _, _ = decode_attention.decode_attention(
            y, new_k, new_k, k, v, lengths, rope=rope, scale=0.08, longest=151
        )
        return out

    if decode_attention.supports(q, k):
        bench("decode-attention kernel (RoPE, writes)", chain(q, attend))
    span = k[:, :, :151]
    bench(
        "scaled_dot_product_attention",
        chain(q, lambda y: mx.fast.scaled_dot_product_attention(y, span, span, scale=0.08)),
    )


if __name__ == "__main__":
    main()
