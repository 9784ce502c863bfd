"""Decode attention on the GPU: one query token per cache row, each row to its own length.

MLX's ``scaled_dot_product_attention`` on CUDA reads a decode batch at about a tenth of the
memory bandwidth (``bench/profile_step.py``: 0.10 ms per layer for 64 rows of 128 positions,
against about 0.01 ms to stream those keys and values), needs the batch sliced to a common
span, and costs 2-3x more again once rows of different lengths need a mask. At 64 sequences
that was a third of a decode step. This module's kernel reads the padded batch cache in place
and stops each row at its own length, so padding is neither read nor masked.

The kernel is split-K ("flash decoding"): a block handles one (row, KV head) pair and one
slice of that row's positions, for all query heads of the GQA group at once, so each key and
value is read once per group rather than once per query head. Each warp keeps an online
softmax over its positions; the block merges its warps, and when a row is split over several
blocks a second small kernel merges the slices. Rows are split only as far as needed to keep
the GPU's multiprocessors busy (few rows, long contexts).

``decode_attention`` returns ``None`` where the kernel does not apply (not CUDA, unusual head
sizes, or ``MLXRUNNER_DECODE_ATTENTION=sdpa``); the caller then uses MLX's attention.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cache
from typing import cast

import mlx.core as mx

_Kernel = Callable[..., list[mx.array]]

WARPS = 4  # warps per block; each walks every WARPS-th position of the block's slice
UNROLL = 4  # positions a warp loads before it computes (memory-level parallelism)
TARGET_BLOCKS = 264  # about two blocks per multiprocessor on an H100/H200 (132 SMs)
# Positions per slice at least. A split costs a second kernel (the merge), and a custom
# kernel call costs about 25 us of host time (MLX builds and hashes its source on every call,
# ``bench/gpu_ops.py``): at 16 rows of 150 positions, splitting in two made the host-bound
# decode step slower, not faster. Long rows still split.
MIN_SLICE = 256

_HEADER = """
template <typename T, int E>
__device__ __forceinline__ void load_lane(const T* src, float (&dst)[E]) {
    constexpr int BYTES = sizeof(T) * E;
    if constexpr (BYTES == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        const T* t = reinterpret_cast<const T*>(&raw);
        #pragma unroll
        for (int e = 0; e < E; ++e) dst[e] = static_cast<float>(t[e]);
    } else if constexpr (BYTES == 8) {
        const uint2 raw = *reinterpret_cast<const uint2*>(src);
        const T* t = reinterpret_cast<const T*>(&raw);
        #pragma unroll
        for (int e = 0; e < E; ++e) dst[e] = static_cast<float>(t[e]);
    } else {
        #pragma unroll
        for (int e = 0; e < E; ++e) dst[e] = static_cast<float>(src[e]);
    }
}

// Online softmax over U positions for the G query heads of one KV head; every lane holds E
// of the D dimensions, and the scores are summed across the warp.
template <int G, int E, int U>
__device__ __forceinline__ void attend_positions(
    const float (&qv)[G][E], const float (&kf)[U][E], const float (&vf)[U][E],
    float (&m)[G], float (&l)[G], float (&acc)[G][E]) {
    float s[U][G];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        #pragma unroll
        for (int g = 0; g < G; ++g) {
            float x = 0.0f;
            #pragma unroll
            for (int e = 0; e < E; ++e) x += qv[g][e] * kf[u][e];
            s[u][g] = x;
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            #pragma unroll
            for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
        }
    }
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        float mn = m[g];
        #pragma unroll
        for (int u = 0; u < U; ++u) mn = fmaxf(mn, s[u][g]);
        const float c = __expf(m[g] - mn);
        l[g] *= c;
        #pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] *= c;
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const float pr = __expf(s[u][g] - mn);
            l[g] += pr;
            #pragma unroll
            for (int e = 0; e < E; ++e) acc[g][e] += pr * vf[u][e];
        }
        m[g] = mn;
    }
}
"""

_MAIN = """
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int split = blockIdx.x;
    const int splits = gridDim.x;
    const int kvh = blockIdx.y;
    const int r = blockIdx.z;
    const int cap = k_shape[2];
    const int n = offsets[r] + 1;
    const int chunk = (n + splits - 1) / splits;
    const int begin = split * chunk;
    const int end = min(begin + chunk, n);
    const float NEG = -1e30f;

    float qv[G][E];
    float m[G], l[G], acc[G][E];
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        const size_t qo = ((size_t)(r * HKV + kvh) * G + g) * D + lane * E;
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            qv[g][e] = static_cast<float>(q[qo + e]) * SCALE;
            acc[g][e] = 0.0f;
        }
        m[g] = NEG;
        l[g] = 0.0f;
    }
    const size_t base = (size_t)(r * HKV + kvh) * cap * D + lane * E;
    int p = begin + warp;
    // U positions per iteration: their loads are in flight together (the loop is bound by
    // memory latency otherwise), and one rescale of the running sums covers all U.
    for (; p + (U - 1) * W < end; p += U * W) {
        float kf[U][E], vf[U][E];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            load_lane<T, E>(k + base + (size_t)(p + u * W) * D, kf[u]);
            load_lane<T, E>(v + base + (size_t)(p + u * W) * D, vf[u]);
        }
        attend_positions<G, E, U>(qv, kf, vf, m, l, acc);
    }
    for (; p < end; p += W) {
        float kf[1][E], vf[1][E];
        load_lane<T, E>(k + base + (size_t)p * D, kf[0]);
        load_lane<T, E>(v + base + (size_t)p * D, vf[0]);
        attend_positions<G, E, 1>(qv, kf, vf, m, l, acc);
    }

    __shared__ float sm[W][G];
    __shared__ float sl[W][G];
    __shared__ float sa[W][G][D];
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane == 0) { sm[warp][g] = m[g]; sl[warp][g] = l[g]; }
        #pragma unroll
        for (int e = 0; e < E; ++e) sa[warp][g][lane * E + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += W * 32) {
        const int g = i / D;
        const int d = i % D;
        float mx_ = NEG;
        #pragma unroll
        for (int w = 0; w < W; ++w) mx_ = fmaxf(mx_, sm[w][g]);
        float L = 0.0f, A = 0.0f;
        #pragma unroll
        for (int w = 0; w < W; ++w) {
            const float f = __expf(sm[w][g] - mx_);
            L += sl[w][g] * f;
            A += sa[w][g][d] * f;
        }
        const size_t head = (size_t)(r * HKV + kvh) * G + g;
        WRITE
    }
"""

_WRITE_FINAL = "out[head * D + d] = static_cast<T>(L > 0.0f ? A / L : 0.0f);"
_WRITE_PARTIAL = """
        const size_t o = head * splits + split;
        part_acc[o * D + d] = A;
        if (d == 0) { part_max[o] = mx_; part_sum[o] = L; }
"""

_MERGE = """
    const int d = threadIdx.x;
    const size_t head = (size_t)blockIdx.z * gridDim.y + blockIdx.y;
    const int splits = part_max_shape[2];
    const size_t o = head * splits;
    float mx_ = -1e30f;
    for (int s = 0; s < splits; ++s) mx_ = fmaxf(mx_, part_max[o + s]);
    float L = 0.0f, A = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float f = __expf(part_max[o + s] - mx_);
        L += part_sum[o + s] * f;
        A += part_acc[(o + s) * D + d] * f;
    }
    out[head * D + d] = static_cast<T>(L > 0.0f ? A / L : 0.0f);
"""


def enabled() -> bool:
    """Whether the kernel can run here: MLX's CUDA backend on the default GPU device."""
    if os.environ.get("MLXRUNNER_DECODE_ATTENTION", "kernel") == "sdpa":
        return False
    return _cuda_gpu()


@cache
def _cuda_gpu() -> bool:
    cuda = getattr(mx, "cuda", None)
    available = cuda is not None and cuda.is_available()
    return bool(available) and mx.default_device() == mx.gpu


def splits_for(rows: int, kv_heads: int, longest: int) -> int:
    """How many slices to cut each row into: enough blocks to fill the GPU, none too short."""
    blocks = rows * kv_heads
    wanted = -(-TARGET_BLOCKS // blocks)
    return max(1, min(wanted, longest // MIN_SLICE))


def decode_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offsets: mx.array,
    *,
    scale: float,
    longest: int,
) -> mx.array | None:
    """Attention of ``queries`` ``[R, Hq, 1, D]`` over the cache ``keys``/``values``
    ``[>=R, Hkv, T, D]``, row ``r`` reading positions ``0..offsets[r]`` (its length, the
    position just written included). ``longest`` bounds ``offsets + 1`` (it sizes the split).
    Returns ``[R, Hq, 1, D]``, or ``None`` where the kernel does not apply."""
    rows, q_heads, one, dims = queries.shape
    kv_heads = keys.shape[1]
    if (
        one != 1
        or dims % 32
        or dims > 256
        or q_heads % kv_heads
        or keys.dtype != queries.dtype
        or not enabled()
    ):
        return None
    group = q_heads // kv_heads
    splits = splits_for(rows, kv_heads, longest)
    template = [
        ("T", queries.dtype),
        ("D", dims),
        ("G", group),
        ("HKV", kv_heads),
        ("W", WARPS),
        ("U", UNROLL),
    ]
    grid = (32 * WARPS * splits, kv_heads, rows)
    block = (32 * WARPS, 1, 1)
    inputs = [queries, keys, values, offsets]
    if splits == 1:
        (out,) = _kernel(float(scale), final=True)(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=block,
            output_shapes=[(rows, q_heads, 1, dims)],
            output_dtypes=[queries.dtype],
        )
        return out
    part_acc, part_max, part_sum = _kernel(float(scale), final=False)(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=block,
        output_shapes=[
            (rows, q_heads, splits, dims),
            (rows, q_heads, splits),
            (rows, q_heads, splits),
        ],
        output_dtypes=[mx.float32] * 3,
    )
    (out,) = _merge_kernel()(
        inputs=[part_acc, part_max, part_sum],
        template=[("T", queries.dtype), ("D", dims)],
        grid=(dims, q_heads, rows),
        threadgroup=(dims, 1, 1),
        output_shapes=[(rows, q_heads, 1, dims)],
        output_dtypes=[queries.dtype],
    )
    return out


@cache
def _kernel(scale: float, *, final: bool) -> _Kernel:
    # The scale is a literal in the source (one kernel per model), not an input array.
    source = _MAIN.replace("SCALE", f"{scale!r}f").replace(
        "WRITE", _WRITE_FINAL if final else _WRITE_PARTIAL
    )
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]  # kernels are cached by name
    kernel = mx.fast.cuda_kernel(
        name=f"decode_attention_{digest}",
        input_names=["q", "k", "v", "offsets"],
        output_names=["out"] if final else ["part_acc", "part_max", "part_sum"],
        source=source,
        header=_HEADER,
    )
    return cast(_Kernel, kernel)


@cache
def _merge_kernel() -> _Kernel:
    kernel = mx.fast.cuda_kernel(
        name="decode_attention_merge",
        input_names=["part_acc", "part_max", "part_sum"],
        output_names=["out"],
        source=_MERGE,
    )
    return cast(_Kernel, kernel)
