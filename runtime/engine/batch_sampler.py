"""TEMPORARY stand-in until the vectorized BatchSampler lands: loops the per-row Sampler."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from runtime.engine.options import SamplingOptions
from runtime.engine.sampler import Sampler


class BatchSampler:
    def __init__(self, *, vocab_size: int, context_length: int) -> None:
        self._vocab = vocab_size
        self._context = context_length
        self._rows: dict[int, Sampler] = {}

    def add(self, row: int, options: SamplingOptions, prompt: Sequence[int]) -> None:
        self._rows[row] = Sampler(
            options, prompt=prompt, vocab_size=self._vocab, context_length=self._context
        )

    def remove(self, row: int) -> None:
        self._rows.pop(row, None)

    def sample(self, logits: mx.array, rows: Sequence[int]) -> mx.array:
        return mx.stack([self._rows[r].sample(logits[i]) for i, r in enumerate(rows)])

    def accept(self, rows: Sequence[int], tokens: mx.array) -> None:
        for i, r in enumerate(rows):
            self._rows[r].accept(tokens[i])

    def rewind(self, rows: Sequence[int], count: int = 1) -> None:
        pass


def batch_logprobs(
    logits: mx.array, tokens: mx.array, top: int
) -> tuple[mx.array, mx.array, mx.array]:
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if top <= 0:
        empty = mx.zeros((logits.shape[0], 0))
        return chosen, empty.astype(mx.int32), empty
    ids = mx.argsort(-logp, axis=-1)[:, :top]
    return chosen, ids, mx.take_along_axis(logp, ids, axis=-1)
