"""Pieces every architecture shares: the attention ``Layout`` contract, RoPE variants, helpers.

A model step runs on a *packed* batch: the tokens of several sequences laid end to end in one
``[1, N]`` row. Everything that works per token (embedding, norms, projections, MLP) runs on
the whole row at once, which is where batching pays (weights are read once per step). Only
attention needs to know which token belongs to which sequence; the model hands its projections
to a ``Layout``, which applies RoPE at each token's position, writes the KV cache and attends.
``SpanLayout`` (here) runs each span against its own ``SequenceCache``, the mlx-lm-compatible
path; the engine's ``BatchLayout`` (``runtime.engine.batch_cache``) runs every decode row in one
attention call on a padded batch cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.engine.kvcache import KVCache, SequenceCache
from runtime.models.fused import causal_attention as fused_causal_attention
from runtime.models.fused import rope as fused_rope
from runtime.models.sliding import causal_window_mask, first_seen


@attrs.frozen
class Span:
    """``length`` tokens at ``start`` in the packed row that belong to the sequence of ``cache``."""

    start: int
    length: int
    cache: SequenceCache


class Rope(nn.Module):
    """Rotary embedding with the scalings the supported checkpoints use (none, linear, llama3,
    yarn, and Phi-3's ``longrope``/``su``).

    ``dims`` may be less than the head size (partial rotary embeddings): only the first ``dims``
    features of each head rotate. ``longrope`` is applied as mlx-lm applies it: always with the
    long factors, and the rotated features scaled by ``sqrt(1 + ln(s) / ln(original))`` where
    ``s`` is how far ``max_position_embeddings`` extends the original context.
    """

    def __init__(
        self,
        dims: int,
        *,
        base: float,
        traditional: bool = False,
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base: float | None = base
        self.scale = 1.0
        self.mscale = 1.0
        self._freqs: mx.array | None = None
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])  # type: ignore[index]
        elif kind == "llama3":
            self._freqs = _llama3_freqs(dims, base, scaling or {}, max_position_embeddings)
            self.base = None
        elif kind == "yarn":
            self._freqs, self.mscale = _yarn(dims, base, scaling or {})
            self.base = None
        elif kind in ("longrope", "su"):
            self._freqs, self.mscale = _longrope(dims, base, scaling or {}, max_position_embeddings)
            self.base = None
        elif kind not in ("default", None):
            raise ValueError(f"unsupported rope scaling {kind!r}")
        if self._freqs is not None:
            inverse = 1.0 / self._freqs.astype(mx.float32)
        else:
            half = dims // 2
            inverse = mx.power(2.0, -(mx.arange(half, dtype=mx.float32) / half) * math.log2(base))
        mx.eval(inverse)  # now: a compiled step may not evaluate arrays while it is traced
        self._inverse = inverse

    def inverse_frequencies(self) -> mx.array:
        """``[dims // 2]`` float32: the angle per position of each rotated pair, as MLX's RoPE
        computes it (for kernels that rotate in place, ``runtime.engine.decode_attention``)."""
        return self._inverse

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        if self.mscale != 1.0:
            x = x.at[..., : self.dims].multiply(self.mscale)
        return fused_rope(
            x,
            offset,
            dims=self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            freqs=self._freqs,
        )


def _llama3_freqs(dims: int, base: float, cfg: dict[str, Any], max_pos: int) -> mx.array:
    factor = float(cfg.get("factor", 1.0))
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg.get("original_max_position_embeddings", max_pos))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    wavelens = 2 * math.pi * freqs
    freqs = mx.where(wavelens > low_wavelen, freqs * factor, freqs)
    medium = (wavelens > high_wavelen) & (wavelens < low_wavelen)
    smooth = (old_ctx / wavelens - low) / (high - low)
    smoothed = freqs / ((1 - smooth) / factor + smooth)
    return mx.where(medium, smoothed, freqs)


def _longrope(dims: int, base: float, cfg: dict[str, Any], max_pos: int) -> tuple[mx.array, float]:
    long_factor = cfg.get("long_factor", 1.0)
    if isinstance(long_factor, list) and len(long_factor) != dims // 2:
        raise ValueError(
            f"longrope long_factor has {len(long_factor)} values, expected {dims // 2}"
        )
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    original = float(cfg.get("original_max_position_embeddings") or max_pos)
    extension = max_pos / original
    mscale = cfg.get("long_mscale") or (
        1.0 if extension <= 1.0 else math.sqrt(1 + math.log(extension) / math.log(original))
    )
    return mx.array(long_factor, dtype=mx.float32) * freqs, float(mscale)


def _yarn(dims: int, base: float, cfg: dict[str, Any]) -> tuple[mx.array, float]:
    """YaRN: frequencies between ``beta_fast`` and ``beta_slow`` rotations over the original
    context blend from extrapolated to interpolated (divided by ``factor``)."""
    factor = float(cfg["factor"])
    original = float(cfg.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(cfg.get("beta_fast", 32)), float(cfg.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = float(max(math.floor(correction_dim(beta_fast)), 0))
    high = float(min(math.ceil(correction_dim(beta_slow)), dims - 1))
    if low == high:
        high += 0.001  # a ramp of one step
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolated = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    interpolated = factor * extrapolated
    keep = 1.0 - ramp
    freqs = interpolated * extrapolated / (interpolated * keep + extrapolated * ramp)

    def attention_factor(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    mscale = attention_factor(float(cfg.get("mscale", 1))) / attention_factor(
        float(cfg.get("mscale_all_dim", 0))
    )
    return freqs, mscale


class Layout(Protocol):
    """Where each token of a packed ``[1, N]`` row attends: the step's attention and KV writes."""

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        layer: int,
        rope: Rope,
        scale: float,
        window: int | None = None,
    ) -> mx.array:
        """Attention for packed ``[1, H, N, D]`` projections; returns ``[1, N, H * D]``
        (the engine's flat decode steps: ``[N, H, 1, D]`` in, ``[N, H * D]`` out).
        With ``window``, each query sees at most the last ``window`` positions
        (``runtime.models.sliding``)."""
        ...


@attrs.frozen
class SpanLayout:
    """Each span against its own ``SequenceCache`` (mlx-lm-compatible single-sequence calls)."""

    spans: Sequence[Span]

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        layer: int,
        rope: Rope,
        scale: float,
        window: int | None = None,
    ) -> mx.array:
        # RoPE is applied here because each span starts at its own position.
        outputs = []
        for span in self.spans:
            if len(self.spans) == 1:
                q, k, v = queries, keys, values
            else:
                end = span.start + span.length
                q = queries[:, :, span.start : end]
                k = keys[:, :, span.start : end]
                v = values[:, :, span.start : end]
            cache: KVCache = span.cache[layer]
            offset = cache.offset
            q = rope(q, offset)
            k = rope(k, offset)
            k, v = cache.update_and_fetch(k, v)
            if window is not None and offset + span.length > window:
                first = first_seen(offset, window)
                k, v = k[:, :, first:], v[:, :, first:]
                mask = causal_window_mask(offset, span.length, window)
                outputs.append(
                    mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
                )
            else:
                outputs.append(fused_causal_attention(q, k, v, scale=scale))
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
        return merge_heads(out)


class CausalLM(nn.Module):
    """An architecture's top module: ``model`` (embeddings, layers, final norm) and the
    unembedding, tied to the embeddings or an ``lm_head``; the calls the engine makes
    (``hidden``, ``unembed``) and mlx-lm's ``Model.__call__`` for a ``[1, L]`` prompt.

    ``FUSABLE_PROJECTIONS``: the layers project through ``projections.qkv``/``gate_up``, so an
    engine may fuse them (``runtime.models.projections``).
    """

    FUSABLE_PROJECTIONS = False

    def __init__(self, args: Any, body: nn.Module) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = body
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def hidden(self, inputs: mx.array, layout: Layout) -> mx.array:
        """Final hidden states ``[1, N, D]`` of the packed token row ``inputs`` (``[1, N]``)."""
        out: mx.array = self.model(inputs, layout)
        return out

    def unembed(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            tied: mx.array = self.model.embed_tokens.as_linear(hidden)
            return tied
        out: mx.array = self.lm_head(hidden)
        return out

    def __call__(self, inputs: mx.array, cache: SequenceCache | None = None) -> mx.array:
        """Logits for a ``[1, L]`` prompt, like mlx-lm's ``Model.__call__``."""
        cache = cache if cache is not None else self.make_cache()
        return self.unembed(self.hidden(inputs, single_span(inputs, cache)))

    def make_cache(self) -> SequenceCache:
        return SequenceCache(self.num_layers)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)


def merge_heads(x: mx.array) -> mx.array:
    """``[1, H, N, D]`` -> ``[1, N, H * D]``."""
    batch, heads, length, dims = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * dims)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """``[1, N, H * D]`` -> ``[1, H, N, D]``; a flat decode step's ``[N, H * D]`` -> ``[N, H, 1, D]``."""
    if x.ndim == 2:  # one reshape: the transpose would move an axis of size 1
        return x.reshape(x.shape[0], heads, 1, -1)
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def single_span(inputs: mx.array, cache: SequenceCache) -> SpanLayout:
    """The layout of an unpacked ``[1, L]`` call (the mlx-lm-compatible path)."""
    if inputs.ndim != 2 or inputs.shape[0] != 1:
        raise ValueError("expected token ids shaped [1, L]")
    return SpanLayout([Span(0, inputs.shape[1], cache)])


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fold newer HF spellings into the fields the model args read.

    transformers >= 4.5x writes ``rope_parameters`` (``rope_theta`` and scaling together) where
    older configs have top-level ``rope_theta`` and ``rope_scaling``.
    """
    out = dict(config)
    params = out.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in params and out.get("rope_theta") is None:
            out["rope_theta"] = params["rope_theta"]
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default") and out.get("rope_scaling") is None:
            out["rope_scaling"] = params
    if out.get("rope_theta") is None:
        out.pop("rope_theta", None)
    return out
