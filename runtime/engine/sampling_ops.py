"""The array operations behind ``BatchSampler``: exact top-k by blocks, the filters that need
sorted candidates (typical_p, top_p, min_p), counter-based draws, and the logprobs a step
reports. Plain functions of MLX arrays (and the host's numpy draw keys); the sampling order,
the row state and the draw's statistics are described in ``runtime.engine.batch_sampler``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

# Splitting a partition in blocks adds about a dozen small operations; it pays when it saves
# partitioning more elements (rows x elements) than this (measured with MLX on CPU).
_SPLIT_SAVES = 8192


def top_k(values: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The indices ``[R, k]`` (uint32, in no order) and values of each row's k largest.

    Partitioning the whole vocabulary is the costliest step of sampling, so it runs on two
    small arrays instead: cut a row into blocks, take the k blocks with the largest maxima,
    then the k largest of their values. Exact: a block outside those k has a max below k
    values of other blocks, so none of its values is among the k largest. Block j holds
    ``j, j + B, j + 2B...``, so the maxima are an elementwise max over the rows of a view.
    """
    rows, n = values.shape
    size = 1 << max(0, round(math.log2(math.sqrt(n / k))))
    blocks = n // size
    if size < 4 or blocks < 2 * k or rows * (n - blocks - size * k) < _SPLIT_SAVES:
        at = mx.argpartition(values, kth=n - k, axis=-1)[:, n - k :]
        return at, mx.take_along_axis(values, at, axis=-1)
    split = blocks * size
    grid = (values if split == n else values[:, :split]).reshape(rows, size, blocks)
    best, _ = top_k(mx.max(grid, axis=1), k)
    candidates = mx.take_along_axis(grid, best[:, None, :], axis=2).reshape(rows, size * k)
    if split < n:  # the last values, fewer than a block, are candidates as they are
        candidates = mx.concatenate([candidates, values[:, split:]], axis=1)
    at, top = top_k(candidates, k)
    ids = (at // k) * blocks + mx.take_along_axis(best, at % k, axis=-1)
    if split < n:
        ids = mx.where(at < size * k, ids, at + (split - size * k))
    return ids, top


def filter_sorted(
    scaled: mx.array, typical_p: np.ndarray, top_p: np.ndarray, min_p: np.ndarray
) -> mx.array | None:
    """The candidates typical_p, then top_p, then min_p keep (None: all), for rows sorted
    descending.

    Each filter sees the survivors of the previous one renormalized (llama.cpp's chain) and
    keeps at least one token. A row whose option is off is left bit-for-bit as it was (its
    bound is one no mass reaches), so its draws do not depend on its batch-mates' options.
    """
    probs = mx.softmax(scaled, axis=-1)
    keep: mx.array | None = None
    typical = typical_p < 1.0
    if typical.any():
        # Locally typical: keep the tokens whose surprise is closest to the entropy, until
        # their mass reaches typical_p (the crossing token included).
        logp = mx.log(mx.maximum(probs, 1e-30))
        entropy = -mx.sum(probs * logp, axis=-1, keepdims=True)
        by_typicality = mx.argsort(mx.abs(logp + entropy), axis=-1)
        p_t = mx.take_along_axis(probs, by_typicality, axis=-1)
        bound = as_column(np.where(typical, typical_p, 2.0))
        keep_t = (mx.cumsum(p_t, axis=-1) - p_t) < bound
        # by_typicality is a permutation: every position is written, whatever the target.
        keep = mx.put_along_axis(keep_t, by_typicality, keep_t, axis=-1)
        kept = mx.where(keep, probs, 0.0)
        renormalized = kept / mx.maximum(mx.sum(kept, axis=-1, keepdims=True), 1e-20)
        probs = renormalized if typical.all() else mx.where(as_column(typical), renormalized, probs)
    nucleus = top_p < 1.0
    if nucleus.any():
        # Keep a token iff the mass strictly before it is below top_p.
        bound = as_column(np.where(nucleus, top_p, 2.0))
        kept = (mx.cumsum(probs, axis=-1) - probs) < bound
        keep = kept if keep is None else keep & kept
    if min_p.any():
        surviving = probs if keep is None else mx.where(keep, probs, 0.0)
        floor = as_column(min_p) * mx.max(surviving, axis=-1, keepdims=True)
        kept = surviving >= floor
        keep = kept if keep is None else keep & kept
    return keep


def as_column(values: np.ndarray) -> mx.array:
    """A host vector (maybe a strided record field) as a device column ``[R, 1]``."""
    return mx.array(np.ascontiguousarray(values)[:, None])


def draw_keys(seeds: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """splitmix64 of (seed, draw index) per row, as two uint32 words (numpy wraps uint64)."""
    z = seeds + np.uint64(0x9E3779B97F4A7C15) * (draws.astype(np.uint64) + np.uint64(1))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0xFFFFFFFF)).astype(np.uint32), (z >> np.uint64(32)).astype(np.uint32)


def _mix32(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * mx.array(0x21F0AAAD, dtype=mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x735A2D97, dtype=mx.uint32)
    return x ^ (x >> 15)


def log_exponential(keys: tuple[np.ndarray, np.ndarray], token_ids: mx.array) -> mx.array:
    """log of an Exp(1) variate per candidate (minus a Gumbel variate): a pure function of
    the row's key (two uint32 words, one per row) and the token id."""
    x = token_ids.astype(mx.uint32) * mx.array(0x9E3779B9, dtype=mx.uint32)
    x = _mix32(_mix32(x ^ as_column(keys[0])) ^ as_column(keys[1]))
    # 23 bits plus a half is exact in float32: the uniform is strictly inside (0, 1).
    uniform = ((x >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))
    return mx.log(-mx.log(uniform))


def batch_logprobs(
    logits: mx.array, tokens: mx.array, top: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Lazy log-probabilities from raw ``[R, V]`` logits, for the engine to read in its sync.

    Returns:
        The logprob of each row's token ``[R]``; the ``top`` likeliest ids ``[R, top]``
        (int32, likeliest first; ``top`` is capped at V, 0 gives ``[R, 0]``) and their
        logprobs ``[R, top]``.
    """
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logp, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]
    k = min(top, logp.shape[-1])
    if k <= 0:
        rows = logp.shape[0]
        return chosen, mx.zeros((rows, 0), dtype=mx.int32), mx.zeros((rows, 0), dtype=mx.float32)
    best, values = top_k(logp, k)
    order = mx.argsort(-values, axis=-1)
    best = mx.take_along_axis(best, order, axis=-1).astype(mx.int32)
    return chosen, best, mx.take_along_axis(values, order, axis=-1)
