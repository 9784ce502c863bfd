"""The GPU decode-attention kernel against MLX's attention: equal outputs, and the time of each.

For each shape (rows, cache capacity, KV heads, query heads, head size) it fills a padded
cache, gives the rows different lengths, and compares ``runtime.engine.decode_attention``
with ``mx.fast.scaled_dot_product_attention`` over the span with a length mask (the engine's
previous path), then times both (and MLX's attention without a mask, its best case, for rows
of equal length). CUDA only.

Run: ``python bench/decode_attention.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from runtime.engine.decode_attention import decode_attention, enabled

SHAPES = [  # rows, capacity, kv heads, query heads, head size, longest length
    (1, 256, 8, 32, 128, 140),
    (1, 4096, 8, 32, 128, 4000),
    (4, 512, 8, 32, 128, 300),
    (16, 256, 8, 32, 128, 200),
    (16, 4096, 8, 32, 128, 3000),
    (64, 256, 8, 32, 128, 256),
    (64, 1024, 8, 32, 128, 1000),
    (7, 512, 8, 32, 64, 400),
    (5, 256, 4, 28, 128, 100),
    (3, 256, 2, 16, 64, 60),
]


def timed(fn, repeats: int = 10, layers: int = 32) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds per call, calls issued ``layers`` at a time as a step issues them."""
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval([fn() for _ in range(layers)])
    return (time.perf_counter() - start) / (repeats * layers) * 1000


def check(rows: int, cap: int, hkv: int, hq: int, d: int, longest: int) -> float:
    dt = mx.bfloat16
    q = mx.random.normal((rows, hq, 1, d)).astype(dt)
    k = mx.random.normal((rows, hkv, cap, d)).astype(dt)
    v = mx.random.normal((rows, hkv, cap, d)).astype(dt)
    lengths = [
        longest if r == 0 else max(1, (longest * (r + 1)) // (rows + 1)) for r in range(rows)
    ]
    offsets = mx.array([n - 1 for n in lengths], dtype=mx.int32)
    mask = (mx.arange(longest)[None] <= offsets[:, None]).reshape(rows, 1, 1, longest)
    scale = d**-0.5

    def ours() -> mx.array:
        out = decode_attention(q, k, v, offsets, scale=scale, longest=longest)
        assert out is not None
        return out

    def sdpa() -> mx.array:
        return mx.fast.scaled_dot_product_attention(
            q, k[:, :, :longest], v[:, :, :longest], scale=scale, mask=mask
        )

    def sdpa_nomask() -> mx.array:
        return mx.fast.scaled_dot_product_attention(
            q, k[:, :, :longest], v[:, :, :longest], scale=scale
        )

    err = mx.abs(ours().astype(mx.float32) - sdpa().astype(mx.float32)).max().item()
    print(
        f"{rows:>4} {cap:>5} {hkv:>3} {hq:>3} {d:>4} {longest:>5} {err:>8.4f} "
        f"{timed(ours):>9.3f} {timed(sdpa):>9.3f} {timed(sdpa_nomask):>11.3f}"
    )
    return float(err)  # type: ignore[arg-type]


def main() -> int:
    if not enabled():
        print("needs MLX's CUDA backend")
        return 1
    mx.random.seed(0)
    print(
        f"{'rows':>4} {'cap':>5} {'hkv':>3} {'hq':>3} {'d':>4} {'len':>5} "
        f"{'max err':>8} {'kernel ms':>9} {'sdpa mask':>9} {'sdpa nomask':>11}"
    )
    worst = 0.0
    for shape in SHAPES:
        worst = max(worst, check(*shape))
    print(f"worst abs difference {worst:.4f} (bf16 outputs)")
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
