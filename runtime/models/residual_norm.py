"""A residual add and the RMSNorm after it, in one CUDA kernel.

A pre-norm decoder layer adds the attention's output to its input and norms the sum for the
MLP, then adds the MLP's output and norms that for the next layer: two adds and two norms per
layer, four MLX nodes. On the GPU a decode step is bound by the host's time per node at many
rows and by the device's small kernels at one (``bench/profile_step.py``), and both shrink
with the node count. ``add_rms_norm`` returns the sum and its norm from one kernel: each block
reads one row of both inputs once, writes the sum, and scales it by its root mean square.

The arithmetic is MLX's: the sum rounded to the dtype, squares summed in float32, the row
times ``rsqrt(mean + eps)`` rounded, then times the weight in the dtype (``mx.fast.rms_norm``
on CUDA). Only the order of the float32 sum differs, so outputs agree to a rounding step
(``bench/residual_norm.py`` checks it on the device). Elsewhere (the CPU, dtypes that differ,
rows not a multiple of 8 wide) ``applies`` says no and the caller uses MLX's two operations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from typing import cast

import mlx.core as mx

from runtime.models.quantized_linear import on_cuda

THREADS = 256  # per row; a row of 4096 is two 16-byte loads per thread

_SOURCE = """
    constexpr int V = 8;  // elements per 16-byte load (bf16 / fp16)
    const size_t row = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const uint4* xs = reinterpret_cast<const uint4*>(x + row * D);
    const uint4* ds = reinterpret_cast<const uint4*>(delta + row * D);
    uint4* hs = reinterpret_cast<uint4*>(sum + row * D);
    float squares = 0.0f;
    for (int i = threadIdx.x; i < D / V; i += N) {
        const uint4 a = xs[i], b = ds[i];
        uint4 c;
        const T* ta = reinterpret_cast<const T*>(&a);
        const T* tb = reinterpret_cast<const T*>(&b);
        T* tc = reinterpret_cast<T*>(&c);
        #pragma unroll
        for (int e = 0; e < V; ++e) {
            tc[e] = static_cast<T>(static_cast<float>(ta[e]) + static_cast<float>(tb[e]));
            const float h = static_cast<float>(tc[e]);
            squares += h * h;
        }
        hs[i] = c;
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    __shared__ float partial[N / 32];
    if (lane == 0) partial[warp] = squares;
    __syncthreads();
    float total = 0.0f;
    #pragma unroll
    for (int w = 0; w < N / 32; ++w) total += partial[w];
    const float scale = rsqrtf(total / D + EPS);
    const uint4* ws = reinterpret_cast<const uint4*>(weight);
    uint4* ns = reinterpret_cast<uint4*>(normed + row * D);
    for (int i = threadIdx.x; i < D / V; i += N) {
        const uint4 c = hs[i], w = ws[i];  // this thread's own writes above
        uint4 n;
        const T* tc = reinterpret_cast<const T*>(&c);
        const T* tw = reinterpret_cast<const T*>(&w);
        T* tn = reinterpret_cast<T*>(&n);
        #pragma unroll
        for (int e = 0; e < V; ++e) {
            const T y = static_cast<T>(static_cast<float>(tc[e]) * scale);
            tn[e] = static_cast<T>(static_cast<float>(tw[e]) * static_cast<float>(y));
        }
        ns[i] = n;
    }
"""


def enabled() -> bool:
    """On MLX's CUDA backend, unless ``MLXRUNNER_RESIDUAL_NORM=0`` (for A/B runs)."""
    return os.environ.get("MLXRUNNER_RESIDUAL_NORM", "1") != "0" and on_cuda()


def applies(x: mx.array, weight: mx.array) -> bool:
    """Whether ``add_rms_norm`` takes rows like ``x`` with this norm weight."""
    dims = x.shape[-1]
    return (
        x.dtype in (mx.bfloat16, mx.float16)
        and weight.dtype == x.dtype
        and weight.shape == (dims,)
        and dims % 8 == 0
        and enabled()
    )


def add_rms_norm(
    x: mx.array, delta: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """``(x + delta, rms_norm(x + delta) * weight)``, where ``applies(x, weight)``."""
    dims = x.shape[-1]
    rows = x.size // dims
    if delta.dtype != x.dtype:
        delta = delta.astype(x.dtype)
    total, normed = _kernel(float(eps))(
        inputs=[x, delta, weight],
        template=[("T", x.dtype), ("D", dims), ("N", THREADS)],
        grid=(rows * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )
    return total, normed


@cache
def _kernel(eps: float) -> Callable[..., list[mx.array]]:
    kernel = mx.fast.cuda_kernel(
        name=f"add_rms_norm_{abs(hash(eps)) % 10**8}",
        input_names=["x", "delta", "weight"],
        output_names=["sum", "normed"],
        source=_SOURCE.replace("EPS", f"{eps!r}f"),
    )
    return cast(Callable[..., list[mx.array]], kernel)
