"""RoPE, RMSNorm and attention as fused kernels on the CPU too.

On the GPU, ``mx.fast.rope``, ``mx.fast.rms_norm`` and ``mx.fast.scaled_dot_product_attention``
are single kernels. MLX's CPU backend has no such kernels: it builds each call as a graph of
small ops instead (counted on a decode step: RoPE with per-row offsets alone is about twenty
nodes, and a layer about 150), and on a small model the host's time per node is a large part of
a decode step. Run through ``mx.compile``, each call becomes one traced graph whose elementwise
ops are fused, which MLX caches by shape (compiling a new shape takes milliseconds).

Only calls whose arguments are arrays or fixed per model go through the compiled path: an
``int`` offset (a prefill chunk's) would be a constant of the trace and compile once per value.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _rope(
    x: mx.array,
    offset: mx.array,
    dims: int,
    traditional: bool,
    base: float | None,
    scale: float,
    freqs: mx.array | None,
) -> mx.array:
    return mx.fast.rope(
        x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
    )


def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def _attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None
) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


_rope_compiled: Any = mx.compile(_rope)
_rms_norm_compiled: Any = mx.compile(_rms_norm)
_attention_compiled: Any = mx.compile(_attention)


def rope(
    x: mx.array,
    offset: int | mx.array,
    *,
    dims: int,
    traditional: bool,
    base: float | None,
    scale: float,
    freqs: mx.array | None,
) -> mx.array:
    if _on_cpu() and isinstance(offset, mx.array):
        out: mx.array = _rope_compiled(x, offset, dims, traditional, base, scale, freqs)
        return out
    return _rope(x, offset, dims, traditional, base, scale, freqs)  # type: ignore[arg-type]


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if _on_cpu():
        out: mx.array = _rms_norm_compiled(x, weight, eps)
        return out
    return mx.fast.rms_norm(x, weight, eps)


def attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: mx.array | None
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` with an array mask or none (not "causal")."""
    if _on_cpu():
        out: mx.array = _attention_compiled(q, k, v, scale, mask)
        return out
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, same checkpoint names) through ``rms_norm`` above."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)
