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

The kernel also does what five MLX nodes per layer did around it: it reads the new token's
query, key and value through their strides (views of the fused projection), applies RoPE
(every variant ``runtime.models.common.Rope`` has, from its inverse frequencies), writes the
key and value into the cache at each row's position and attends. On the GPU a decode step is
bound by the host's time per node, and at batch 1 by the device's small kernels: at 16 and 64
rows of the 8B model the step's 650 nodes became 520 and its throughput rose 13% and 20%
(``bench/profile_step.py``; README has the figures).

The cache is written in place, behind MLX's back: MLX sees it as an input only. That is safe
because of where the writes land. A row writes only position ``offsets[r]``, its sequence's
next one, which no other array can hold yet: a saved prefix (``BatchKVCache.copy_out``) covers
positions below a row's length, and every other change of a row's contents (prefill, a prefix
copied in, growth) goes through MLX ops, which copy the buffer when anything else still reads
it. A row at -1 (one that does not decode this step, a prompt chunk's among them) is neither
written nor read, so a prompt written by the same step is not overwritten.

``supports`` says where the kernel applies (CUDA, head sizes a multiple of 32 up to 256, its
shared memory; ``MLXRUNNER_DECODE_ATTENTION=sdpa`` turns it off); elsewhere the caller rotates,
writes and attends with MLX's ops.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, cast

import mlx.core as mx

if TYPE_CHECKING:
    from runtime.models.common import Rope

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
template <typename T>
__device__ __forceinline__ float rounded(float x) {
    return static_cast<float>(static_cast<T>(x));
}

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
    constexpr int HALF = ROT / 2;
    constexpr int THREADS = W * 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int split = blockIdx.x;
    const int splits = gridDim.x;
    const int kvh = blockIdx.y;
    const int r = blockIdx.z;
    const int pos = offsets[r];  // the new token's position; -1: a row that does not decode
    const int n = pos + 1;
    const int chunk = (n + splits - 1) / splits;
    const int begin = split * chunk;
    const int end = min(begin + chunk, n);
    const bool owner = begin <= pos && pos < end;  // this block writes (and reads) position pos
    const float NEG = -1e30f;

    // The new token's G queries, key and value, read through their strides (views of the
    // fused projection) into shared memory, where RoPE rotates the queries and the key; each
    // result is rounded to T, as MLX's RoPE stores it.
    __shared__ float sx[G + 2][D];
    for (int i = threadIdx.x; i < G * D; i += THREADS) {
        const int g = i / D, d = i % D;
        sx[g][d] = static_cast<float>(
            q[r * q_strides[0] + (kvh * G + g) * q_strides[1] + d * q_strides[3]]);
    }
    for (int d = threadIdx.x; d < D; d += THREADS) {
        sx[G][d] = static_cast<float>(
            k_new[r * k_new_strides[0] + kvh * k_new_strides[1] + d * k_new_strides[3]]);
        sx[G + 1][d] = static_cast<float>(
            v_new[r * v_new_strides[0] + kvh * v_new_strides[1] + d * v_new_strides[3]]);
    }
    __syncthreads();
    const float angle = POS_SCALE * static_cast<float>(pos);
    for (int i = threadIdx.x; i < (G + 1) * HALF; i += THREADS) {
        const int h = i / HALF, j = i % HALF;
        const int a = TRAD ? 2 * j : j;
        const int b = TRAD ? 2 * j + 1 : j + HALF;
        const float theta = angle * inv_freq[j];
        const float c = cos(theta), s = sin(theta);
        const float x1 = rounded<T>(sx[h][a] * MSCALE), x2 = rounded<T>(sx[h][b] * MSCALE);
        sx[h][a] = rounded<T>(x1 * c - x2 * s);
        sx[h][b] = rounded<T>(x1 * s + x2 * c);
    }
    __syncthreads();
    const int64_t k_row = r * k_strides[0] + kvh * k_strides[1];
    const int64_t v_row = r * v_strides[0] + kvh * v_strides[1];
    if (owner) {
        // The cache is written in place: MLX sees it as an input only. Nothing else reads
        // this position before the next step (see the module docstring).
        T* k_out = const_cast<T*>(k);
        T* v_out = const_cast<T*>(v);
        for (int d = threadIdx.x; d < D; d += THREADS) {
            k_out[k_row + pos * k_strides[2] + d] = static_cast<T>(sx[G][d]);
            v_out[v_row + pos * v_strides[2] + d] = static_cast<T>(sx[G + 1][d]);
        }
    }

    float qv[G][E];
    float m[G], l[G], acc[G][E];
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            qv[g][e] = sx[g][lane * E + e] * SCALE;
            acc[g][e] = 0.0f;
        }
        m[g] = NEG;
        l[g] = 0.0f;
    }
    const int64_t k_base = k_row + lane * E;
    const int64_t v_base = v_row + lane * E;
    const int64_t k_step = k_strides[2];
    const int64_t v_step = v_strides[2];
    // The new position comes from shared memory, not from the cache just written.
    const int stop = owner ? pos : end;
    int p = begin + warp;
    // U positions per iteration: their loads are in flight together (the loop is bound by
    // memory latency otherwise), and one rescale of the running sums covers all U.
    for (; p + (U - 1) * W < stop; p += U * W) {
        float kf[U][E], vf[U][E];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            load_lane<T, E>(k + k_base + (p + u * W) * k_step, kf[u]);
            load_lane<T, E>(v + v_base + (p + u * W) * v_step, vf[u]);
        }
        attend_positions<G, E, U>(qv, kf, vf, m, l, acc);
    }
    for (; p < stop; p += W) {
        float kf[1][E], vf[1][E];
        load_lane<T, E>(k + k_base + p * k_step, kf[0]);
        load_lane<T, E>(v + v_base + p * v_step, vf[0]);
        attend_positions<G, E, 1>(qv, kf, vf, m, l, acc);
    }
    if (owner && warp == W - 1) {
        float kf[1][E], vf[1][E];
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            kf[0][e] = sx[G][lane * E + e];
            vf[0][e] = sx[G + 1][lane * E + e];
        }
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
        const size_t head = (size_t)(r * gridDim.y + kvh) * G + g;
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


def supports(queries: mx.array, cache: mx.array) -> bool:
    """Whether the kernel takes decode queries ``[R, Hq, 1, D]`` over ``cache``
    ``[>=R, Hkv, T, D]``: here on CUDA, for head sizes and groups it is built for."""
    _, q_heads, one, dims = queries.shape
    kv_heads = cache.shape[1]
    if one != 1 or dims % 32 or dims > 256 or q_heads % kv_heads or cache.dtype != queries.dtype:
        return False
    group = q_heads // kv_heads
    # Static shared memory (48 KB at most): the warps' partial sums and the new token's heads.
    if 4 * dims * (WARPS * group + group + 2) > 48 * 1024:
        return False
    return enabled()


def decode_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    key_cache: mx.array,
    value_cache: mx.array,
    offsets: mx.array,
    *,
    rope: Rope,
    scale: float,
    longest: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """One decode step's attention for every cache row, where ``supports`` says so.

    ``queries`` ``[R, Hq, 1, D]``, ``keys`` and ``values`` ``[R, Hkv, 1, D]`` are the new
    token's, before RoPE (views of a fused projection are read in place). Row ``r`` rotates
    them to position ``offsets[r]``, writes that key and value into ``key_cache`` and
    ``value_cache`` at that position, in place, and attends over positions
    ``0..offsets[r]``; a row whose offset is -1 does nothing and gets zeros. ``longest``
    bounds ``offsets + 1`` (it sizes the split). Returns the attention ``[R, Hq, 1, D]`` and
    the caches, which are the arrays given (written on the device; MLX's graph sees no write).
    """
    rows, q_heads, _, dims = queries.shape
    kv_heads = key_cache.shape[1]
    group = q_heads // kv_heads
    splits = splits_for(rows, kv_heads, longest)
    template = [
        ("T", queries.dtype),
        ("D", dims),
        ("G", group),
        ("W", WARPS),
        ("U", UNROLL),
        ("ROT", rope.dims),
        ("TRAD", rope.traditional),
    ]
    grid = (32 * WARPS * splits, kv_heads, rows)
    block = (32 * WARPS, 1, 1)
    inputs = [queries, keys, values, key_cache, value_cache, offsets, rope.inverse_frequencies()]
    constants = (float(scale), float(rope.scale), float(rope.mscale))
    if splits == 1:
        (out,) = _kernel(constants, final=True)(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=block,
            output_shapes=[(rows, q_heads, 1, dims)],
            output_dtypes=[queries.dtype],
        )
        return out, key_cache, value_cache
    part_acc, part_max, part_sum = _kernel(constants, final=False)(
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
    return out, key_cache, value_cache


@cache
def _kernel(constants: tuple[float, float, float], *, final: bool) -> _Kernel:
    # The scales are literals in the source (one kernel per model), not input arrays.
    scale, position_scale, mscale = constants
    source = (
        _MAIN.replace("POS_SCALE", f"{position_scale!r}f")
        .replace("MSCALE", f"{mscale!r}f")
        .replace("SCALE", f"{scale!r}f")
        .replace("WRITE", _WRITE_FINAL if final else _WRITE_PARTIAL)
    )
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]  # kernels are cached by name
    kernel = mx.fast.cuda_kernel(
        name=f"decode_attention_{digest}",
        input_names=["q", "k_new", "v_new", "k", "v", "offsets", "inv_freq"],
        output_names=["out"] if final else ["part_acc", "part_max", "part_sum"],
        source=source,
        header=_HEADER,
        # Views are read through their strides, and the caches must be the arrays themselves:
        # a contiguous copy would take the writes.
        ensure_row_contiguous=False,
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
