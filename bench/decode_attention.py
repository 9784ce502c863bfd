"""The GPU decode-attention kernel against MLX's ops: equal results, and the time of each.

The kernel (``runtime.engine.decode_attention``) takes a decode step's new queries, keys and
values before RoPE, rotates them, writes each row's key and value into the padded cache in
place and attends. For each shape (rows, cache capacity, KV heads, query heads, head size,
longest length) and RoPE variant, it runs the same step through MLX's ops as the engine does
where the kernel does not apply (``Rope``, ``put_along_axis``, masked
``scaled_dot_product_attention``) and compares the outputs and the caches; one row in three
is at -1 (not decoding), whose cache the kernel must leave alone and whose output is zeros.
Then it times both paths per layer (MLX's includes copying the cache, which the engine's
in-place update avoids). CUDA only.

Run: ``python bench/decode_attention.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from bench.common import per_call_ms
from runtime.engine.decode_attention import decode_attention, enabled
from runtime.models.common import Rope

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

ROPES: dict[str, Callable[[int], Rope]] = {
    "default": lambda d: Rope(d, base=500000.0),
    "traditional": lambda d: Rope(d, base=10000.0, traditional=True),
    "partial": lambda d: Rope(d // 2, base=10000.0),
    "linear": lambda d: Rope(d, base=10000.0, scaling={"type": "linear", "factor": 2.0}),
    "llama3": lambda d: Rope(
        d,
        base=500000.0,
        scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
    ),
    "yarn": lambda d: Rope(
        d,
        base=10000.0,
        scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    ),
}


def difference(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item())  # type: ignore[arg-type]


def check(shape: tuple[int, ...], rope_name: str) -> float:
    rows, cap, hkv, hq, d, longest = shape
    rope = ROPES[rope_name](d)
    dt = mx.bfloat16
    # Queries, keys and values as views of one fused projection, as the models hand them over.
    fused = mx.random.normal((rows, (hq + 2 * hkv) * d)).astype(dt)
    q = fused[:, : hq * d].reshape(rows, hq, 1, d)
    k_new = fused[:, hq * d : (hq + hkv) * d].reshape(rows, hkv, 1, d)
    v_new = fused[:, (hq + hkv) * d :].reshape(rows, hkv, 1, d)
    k_cache = mx.random.normal((rows, hkv, cap, d)).astype(dt)
    v_cache = mx.random.normal((rows, hkv, cap, d)).astype(dt)
    lengths = [
        longest if r == 0 else max(1, (longest * (r + 1)) // (rows + 1)) for r in range(rows)
    ]
    writes = [n - 1 for n in lengths]
    reads = [-1 if r % 3 == 2 else w for r, w in enumerate(writes)]
    offsets = mx.array(writes, dtype=mx.int32)
    scale = d**-0.5
    mx.eval(fused, k_cache, v_cache)

    def ours(copy: bool = True) -> tuple[mx.array, mx.array, mx.array]:
        k, v = (k_cache * 1, v_cache * 1) if copy else (k_cache, v_cache)  # the kernel writes them
        out, k, v = decode_attention(
            q, k_new, v_new, k, v, mx.array(reads), rope=rope, scale=scale, longest=longest
        )
        return out, k, v

    def theirs() -> tuple[mx.array, mx.array, mx.array]:
        qr, kr = rope(q, offsets), rope(k_new, offsets)
        at = offsets.reshape(rows, 1, 1, 1)
        k = mx.put_along_axis(k_cache, mx.broadcast_to(at, kr.shape), kr, axis=2)
        v = mx.put_along_axis(v_cache, mx.broadcast_to(at, v_new.shape), v_new, axis=2)
        mask = (mx.arange(longest)[None] <= offsets[:, None]).reshape(rows, 1, 1, longest)
        out = mx.fast.scaled_dot_product_attention(
            qr, k[:, :, :longest], v[:, :, :longest], scale=scale, mask=mask
        )
        return out, k, v

    (out, k, v), (want, k_want, v_want) = ours(), theirs()
    mx.eval(out, k, v, want, k_want, v_want)
    decoding = mx.array([r >= 0 for r in reads]).reshape(rows, 1, 1, 1)
    err = max(
        difference(mx.where(decoding, out, 0), mx.where(decoding, want, 0)),
        difference(mx.where(decoding, k, k_cache), mx.where(decoding, k_want, k_cache)),
        difference(mx.where(decoding, v, v_cache), mx.where(decoding, v_want, v_cache)),
        difference(mx.where(decoding, 0, k), mx.where(decoding, 0, k_cache)),  # left alone
        difference(mx.where(decoding, 0, out), mx.zeros_like(out)),
    )
    print(
        f"{rows:>4} {cap:>5} {hkv:>3} {hq:>3} {d:>4} {longest:>5} {rope_name:>11} {err:>8.4f} "
        f"{per_call_ms(lambda: ours(copy=False)):>9.3f} {per_call_ms(theirs):>9.3f}",
        flush=True,
    )
    return err


def main() -> int:
    if not enabled():
        print("needs MLX's CUDA backend")
        return 1
    mx.random.seed(0)
    print(
        f"{'rows':>4} {'cap':>5} {'hkv':>3} {'hq':>3} {'d':>4} {'len':>5} {'rope':>11} "
        f"{'max err':>8} {'kernel ms':>9} {'mlx ms':>9}"
    )
    worst = 0.0
    for shape in SHAPES:
        worst = max(worst, check(shape, "default"))
    for name in ROPES:
        worst = max(worst, check((5, 512, 8, 32, 128, 300), name))
    print(f"worst abs difference {worst:.4f} (bf16 outputs and caches)")
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
