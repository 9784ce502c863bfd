"""Embeddings: pooled final hidden states of a loaded model, and how a batch is cut into jobs.

``embed_tokens`` runs several inputs in one packed forward (``SpanLayout``, a throwaway
``SequenceCache`` per input: the engine's batch KV cache and prefix entries are never touched),
pools each input's final hidden states (the final norm is applied inside ``hidden``) in
float32, and optionally keeps the first ``dimensions`` values and L2-normalises. It runs on
the engine thread only, like every MLX call. The pooling is the mean of the tokens unless the
model's config says otherwise (``POOLING_KEY``, which ``runtime.formats`` fills from a
sentence-transformers ``1_Pooling/config.json`` or a GGUF's ``pooling_type``): the first
token (``cls``), the last one (``last``, as Qwen3-Embedding models are trained), or the
maximum of each dimension (``max``).

``plan_chunks`` is the scheduling decision, plain code: the inputs of one request go to the
engine in chunks of at most ``max_tokens`` tokens (an input longer than that is a chunk of its
own), so that a big batch becomes several short engine jobs with generation steps between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from runtime.engine.kvcache import SequenceCache
from runtime.errors import PromptError
from runtime.formats.model_files import POOLING_KEY, POOLINGS
from runtime.models.common import Span, SpanLayout

# Tokens one embedding job computes at most (more than one input only when they fit together).
EMBED_CHUNK_TOKENS = 2048


def plan_chunks(lengths: Sequence[int], max_tokens: int = EMBED_CHUNK_TOKENS) -> list[range]:
    """Consecutive index ranges of ``lengths``, each summing to at most ``max_tokens`` tokens
    (or holding a single longer input)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    chunks: list[range] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_tokens:
            chunks.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        chunks.append(range(start, len(lengths)))
    return chunks


def embed_tokens(
    model: Any,
    inputs: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    normalize: bool,
    dimensions: int | None = None,
    pooling: str = "mean",
) -> list[list[float]]:
    """One vector per input: its final hidden states pooled (float32, ``pooling`` one of
    ``POOLINGS``); with ``dimensions`` the first that many values; with ``normalize`` scaled
    to unit L2 norm."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}")
    if not inputs:
        return []
    for tokens in inputs:
        if not tokens:
            raise PromptError("an input is empty")
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    spans, start = [], 0
    for tokens in inputs:
        spans.append(Span(start, len(tokens), SequenceCache(model.num_layers)))
        start += len(tokens)
    packed = mx.array([t for tokens in inputs for t in tokens], dtype=mx.int32)[None]
    hidden = model.hidden(packed, SpanLayout(spans))[0].astype(mx.float32)
    pooled = mx.stack(
        [_pool(hidden[span.start : span.start + span.length], pooling) for span in spans]
    )
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        norms = mx.sqrt(mx.sum(pooled * pooled, axis=-1, keepdims=True))
        pooled = pooled / mx.maximum(norms, 1e-12)
    out: list[list[float]] = pooled.tolist()  # type: ignore[assignment]
    return out


def _pool(states: mx.array, pooling: str) -> mx.array:
    if pooling == "cls":
        return states[0]
    if pooling == "last":
        return states[-1]
    if pooling == "max":
        return mx.max(states, axis=0)
    return mx.mean(states, axis=0)


def config_pooling(config: dict[str, Any]) -> str:
    """The pooling a model's config names (``POOLING_KEY``), else the mean."""
    value = config.get(POOLING_KEY)
    return value if value in POOLINGS else "mean"
