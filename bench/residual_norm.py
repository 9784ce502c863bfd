"""The fused residual add + RMSNorm kernel against MLX's two operations, on the GPU.

For each shape (rows x width) and dtype, compares ``runtime.models.residual_norm.add_rms_norm``
with ``x + delta`` and ``mx.fast.rms_norm`` of it (both outputs), then times both per call,
issued 32 at a time as a step issues them. CUDA only.

Run: ``python bench/residual_norm.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from bench.common import per_call_ms
from runtime.models.residual_norm import add_rms_norm, applies

SHAPES = [(1, 4096), (16, 4096), (64, 4096), (2048, 4096), (5, 2048), (3, 3584), (7, 8192)]


def check(rows: int, width: int, dtype: mx.Dtype) -> float:
    x = mx.random.normal((rows, width)).astype(dtype)
    delta = (mx.random.normal((rows, width)) * 0.5).astype(dtype)
    weight = (1 + mx.random.normal((width,)) * 0.1).astype(dtype)
    mx.eval(x, delta, weight)

    def ours() -> tuple[mx.array, mx.array]:
        return add_rms_norm(x, delta, weight, 1e-5)

    def theirs() -> tuple[mx.array, mx.array]:
        total = x + delta
        return total, mx.fast.rms_norm(total, weight, 1e-5)

    (a, b), (c, d) = ours(), theirs()
    err = max(
        float(mx.abs(a.astype(mx.float32) - c.astype(mx.float32)).max().item()),  # type: ignore[arg-type]
        float(mx.abs(b.astype(mx.float32) - d.astype(mx.float32)).max().item()),  # type: ignore[arg-type]
    )
    print(
        f"{rows:>5} {width:>5} {dtype!s:>14} {err:>8.4f} {per_call_ms(ours):>8.4f} {per_call_ms(theirs):>8.4f}",
        flush=True,
    )
    return err


def main() -> int:
    if not applies(mx.zeros((1, 8), mx.bfloat16), mx.zeros((8,), mx.bfloat16)):
        print("needs MLX's CUDA backend")
        return 1
    mx.random.seed(0)
    print(f"{'rows':>5} {'width':>5} {'dtype':>14} {'max err':>8} {'ours ms':>8} {'mlx ms':>8}")
    worst = max(check(*shape, dtype) for shape in SHAPES for dtype in (mx.bfloat16, mx.float16))
    print(f"worst abs difference {worst:.4f}")
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
