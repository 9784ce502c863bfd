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

import os
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


# Queries per block of a prompt chunk's causal attention on the CPU (``causal_attention``);
# ``MLXRUNNER_PROMPT_BLOCK=0`` computes each chunk whole (``bench/cpu_engine.py``'s
# "whole prompts").
PROMPT_BLOCK = int(os.environ.get("MLXRUNNER_PROMPT_BLOCK", "128"))


def causal_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
    """Causal attention of ``q``'s L positions, which are the last L of ``k``/``v``.

    MLX's CPU attention computes a chunk's whole ``[L, P]`` score matrix, masks the future and
    runs the softmax on one thread, and it is most of a long prompt's time there (1000 tokens
    of SmolLM2-135M: 8.1 s, 2.9 s with attention left out). In blocks of ``PROMPT_BLOCK``
    queries, each over only the keys it can see, the scores above the diagonal are never
    computed: the same prompt took 6.5 s against 7.6 (medians of three alternating runs).
    Elsewhere, and for short chunks, MLX's own causal attention.
    """
    length = q.shape[2]
    if not _on_cpu() or PROMPT_BLOCK < 1 or length < 2 * PROMPT_BLOCK:
        mask = "causal" if length > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    start = k.shape[2] - length
    blocks = []
    for first in range(0, length, PROMPT_BLOCK):
        stop = min(first + PROMPT_BLOCK, length)
        seen = start + stop  # "causal" aligns the block's queries with the last keys given
        blocks.append(
            mx.fast.scaled_dot_product_attention(
                q[:, :, first:stop], k[:, :, :seen], v[:, :, :seen], scale=scale, mask="causal"
            )
        )
    return mx.concatenate(blocks, axis=2)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, same checkpoint names) through ``rms_norm`` above."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)
