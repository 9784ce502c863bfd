"""The per-sequence reference sampler: one sequence, one MLX graph at a time.

The engine samples with ``runtime.engine.batch_sampler.BatchSampler``; this plain version is
what its tests (and ``bench/sampler.py``) compare it against, option by option.

Order of operations (Ollama's, with llama.cpp's typical sampling added): penalties on the raw
logits over the last ``repeat_last_n`` tokens (the prompt's included) -> a temperature below
1e-5 means greedy argmax -> top_k -> softmax(logits / temperature) -> typical_p -> top_p ->
min_p -> categorical draw. A seeded sampler derives the key of draw *n* from (seed, n) alone, so a
sequence's samples never depend on what else shares the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import TokenLogprob


def _splitmix64(seed: int, counter: int) -> int:
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (counter + 1)) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


class Sampler:
    """Samples one sequence's tokens; holds its penalty history and its random stream.

    ``sample`` and ``accept`` build lazy MLX graphs: the engine evaluates the samples of a
    whole batch at once, and can feed a sampled token to the next step (and to ``accept``)
    before it is materialized.
    """

    def __init__(
        self,
        options: SamplingOptions,
        *,
        prompt: Sequence[int],
        vocab_size: int,
        context_length: int,
    ) -> None:
        self.options = options
        self.vocab_size = vocab_size
        o = options
        window = context_length if o.repeat_last_n == -1 else o.repeat_last_n
        self._window = min(window, context_length)  # no sequence is longer than its context
        self._penalize = self._window > 0 and (
            o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
        )
        recent = list(prompt)[-self._window :] if self._penalize else []
        self._history = mx.array(recent, dtype=mx.int32)
        self._seed = o.seed if o.seed is not None else secrets.randbits(63)
        self._draws = 0

    @property
    def greedy(self) -> bool:
        return self.options.greedy

    def accept(self, token: int | mx.array) -> None:
        """Add a produced token to the penalty window."""
        if not self._penalize:
            return
        tok = mx.array([token], dtype=mx.int32) if isinstance(token, int) else token.reshape(1)
        self._history = mx.concatenate([self._history, tok.astype(mx.int32)])[-self._window :]

    def _penalties(self, logits: mx.array) -> mx.array:
        # Work on the window's ids only (not a vocabulary-sized count vector). Writing the
        # same penalized value once per occurrence applies repeat and presence once per
        # distinct id; the frequency penalty accumulates per occurrence.
        o = self.options
        history = self._history
        if o.repeat_penalty != 1.0 or o.presence_penalty != 0.0:
            seen = logits[history]
            if o.repeat_penalty != 1.0:
                seen = mx.where(seen < 0, seen * o.repeat_penalty, seen / o.repeat_penalty)
            if o.presence_penalty != 0.0:
                seen = seen - o.presence_penalty
            logits = mx.put_along_axis(logits, history, seen, axis=0)
        if o.frequency_penalty != 0.0:
            logits = logits.at[history].subtract(o.frequency_penalty)
        return logits

    def sample(self, logits: mx.array) -> mx.array:
        """A lazy int32 scalar: the next token for raw ``logits`` of shape ``[V]``.

        Nothing is evaluated here, so the engine can evaluate a whole batch's samples at once.
        """
        o = self.options
        logits = logits.astype(mx.float32)
        if self._penalize and self._history.size:
            logits = self._penalties(logits)
        if self.greedy:
            return mx.argmax(logits).astype(mx.int32)
        key = mx.random.key(_splitmix64(self._seed, self._draws))
        self._draws += 1
        vocab = logits.shape[-1]
        ids: mx.array | None = None
        if 0 < o.top_k < vocab:
            ids = mx.argpartition(-logits, kth=o.top_k - 1)[: o.top_k]
            logits = logits[ids]
        # Shifted first so that a tiny temperature gives -inf, never inf - inf = nan.
        scaled = (logits - mx.max(logits)) / o.temperature
        if o.typical_p >= 1.0 and o.top_p >= 1.0:
            # No filter needs the sorted order (a full sort of the vocabulary costs more than
            # everything else here). min_p in log space: p >= min_p * p_max.
            if o.min_p > 0.0:
                floor = mx.max(scaled) + math.log(o.min_p)
                scaled = mx.where(scaled >= floor, scaled, -mx.inf)
            pick = mx.random.categorical(scaled, key=key)
            return (ids[pick] if ids is not None else pick).astype(mx.int32)
        order = mx.argsort(-scaled)  # candidates by descending probability
        scaled = scaled[order]
        keep = _filter(mx.softmax(scaled), o)
        pick = mx.random.categorical(mx.where(keep, scaled, -mx.inf), key=key)
        chosen = order[pick]
        return (ids[chosen] if ids is not None else chosen).astype(mx.int32)


def _filter(probs: mx.array, o: SamplingOptions) -> mx.array:
    """The tokens typical_p, then top_p, then min_p keep, for ``probs`` sorted descending.

    Each filter sees the survivors of the previous one renormalized (llama.cpp's chain);
    each keeps at least one token, so the draw always has a candidate.
    """
    keep = mx.ones(probs.shape, dtype=mx.bool_)
    if o.typical_p < 1.0:
        # Locally typical sampling: keep the tokens whose surprise is closest to the
        # entropy, until their mass reaches typical_p (the crossing token included).
        logp = mx.log(mx.maximum(probs, 1e-30))
        entropy = -mx.sum(probs * logp)
        by_typicality = mx.argsort(mx.abs(-logp - entropy))
        p_t = probs[by_typicality]
        keep_t = (mx.cumsum(p_t) - p_t) < o.typical_p
        keep = mx.zeros(probs.shape, mx.int32).at[by_typicality].add(keep_t.astype(mx.int32)) > 0
        probs = mx.where(keep, probs, 0.0)
        probs = probs / mx.maximum(mx.sum(probs), 1e-20)
    if o.top_p < 1.0:
        # Nucleus: keep a token iff the mass strictly before it is below top_p.
        keep = keep & ((mx.cumsum(probs) - probs) < o.top_p)
    if o.min_p > 0.0:
        surviving = mx.where(keep, probs, 0.0)
        keep = keep & (surviving >= o.min_p * mx.max(surviving))
    return keep


def logprobs(logits: mx.array, token: int, top: int) -> TokenLogprob:
    """Log-probability of ``token`` and the ``top`` likeliest tokens, from raw logits."""
    logp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, logp.shape[-1])
        ids = mx.argpartition(-logp, kth=k - 1)[:k]
        ids = ids[mx.argsort(-logp[ids])]
        id_list = np.array(ids).tolist()
        val_list = np.array(logp[ids]).tolist()
        best = tuple(zip(id_list, val_list, strict=True))
    return TokenLogprob(token=token, logprob=float(np.array(logp[token])), top=best)
