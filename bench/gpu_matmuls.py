"""What a decode step's matmuls alone cost on the GPU, and whether fused projections help.

Builds the 32 layers of the random 8B-class llama as plain bf16 weight matrices and times, at
1, 16, 64 and 128 rows: the seven projections per layer in sequence with the residual adds and
SwiGLU (``separate``), the same with one QKV and one gate-up matrix (``fused``), and the bare
matmuls. Each figure splits into the host's graph building and the whole call; a decode step
slower than ``separate`` spends the difference outside the matmuls.

Run: ``python bench/gpu_matmuls.py`` (needs about 30 GB of device memory).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

HIDDEN, INTERMEDIATE, LAYERS, KV = 4096, 14336, 32, 1024
Layer = dict[str, mx.array]


def weight(*shape: int) -> mx.array:
    return (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)


def make_layers() -> list[Layer]:
    layers = []
    for _ in range(LAYERS):
        w = {
            "q": weight(HIDDEN, HIDDEN),
            "k": weight(KV, HIDDEN),
            "v": weight(KV, HIDDEN),
            "o": weight(HIDDEN, HIDDEN),
            "g": weight(INTERMEDIATE, HIDDEN),
            "u": weight(INTERMEDIATE, HIDDEN),
            "d": weight(HIDDEN, INTERMEDIATE),
        }
        w["qkv"] = mx.concatenate([w["q"], w["k"], w["v"]])
        w["gu"] = mx.concatenate([w["g"], w["u"]])
        mx.eval(w)
        layers.append(w)
    return layers


def separate(x: mx.array, layers: list[Layer]) -> list[mx.array]:
    outs = []
    for w in layers:
        q, k, v = x @ w["q"].T, x @ w["k"].T, x @ w["v"].T
        outs += [k, v]
        x = x + q @ w["o"].T
        x = x + (nn.silu(x @ w["g"].T) * (x @ w["u"].T)) @ w["d"].T
    return [x, *outs]


def fused(x: mx.array, layers: list[Layer]) -> list[mx.array]:
    outs = []
    for w in layers:
        qkv = x @ w["qkv"].T
        q = qkv[..., :HIDDEN]
        outs += [qkv[..., HIDDEN : HIDDEN + KV], qkv[..., HIDDEN + KV :]]
        x = x + q @ w["o"].T
        gu = x @ w["gu"].T
        x = x + (nn.silu(gu[..., :INTERMEDIATE]) * gu[..., INTERMEDIATE:]) @ w["d"].T
    return [x, *outs]


def bare(x: mx.array, layers: list[Layer]) -> list[mx.array]:
    inner = mx.zeros((x.shape[0], INTERMEDIATE), mx.bfloat16)
    outs = [x @ w[name].T for w in layers for name in ("q", "k", "v", "o", "g", "u")]
    return outs + [inner @ w["d"].T for w in layers]


def timed(
    fn: Callable[[mx.array, list[Layer]], list[mx.array]], layers: list[Layer], rows: int
) -> tuple[float, float]:
    x = mx.random.normal((rows, HIDDEN)).astype(mx.bfloat16)
    mx.eval(fn(x, layers))
    build, total = [], []
    for _ in range(20):
        start = time.perf_counter()
        outs = fn(x, layers)
        built = time.perf_counter()
        mx.eval(outs)
        build.append(built - start)
        total.append(time.perf_counter() - start)
    return statistics.median(build) * 1e3, statistics.median(total) * 1e3


def main() -> None:
    layers = make_layers()
    print(
        f"{'rows':>5}  "
        + "  ".join(f"{n + ' build/total ms':>26}" for n in ("separate", "fused", "bare"))
    )
    for rows in (1, 16, 64, 128):
        cells = [timed(fn, layers, rows) for fn in (separate, fused, bare)]
        print(f"{rows:>5}  " + "  ".join(f"{b:>12.2f} / {t:>11.2f}" for b, t in cells))


if __name__ == "__main__":
    main()
