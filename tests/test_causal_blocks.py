"""A prompt chunk's attention in causal blocks of queries on the CPU (``fused.causal_attention``)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from runtime.models import fused


def _qkv(length: int, positions: int) -> tuple[mx.array, mx.array, mx.array]:
    mx.random.seed(3)
    q = mx.random.normal((1, 6, length, 16))
    k = mx.random.normal((1, 2, positions, 16))  # GQA: three query heads per key head
    v = mx.random.normal((1, 2, positions, 16))
    return q, k, v


@pytest.mark.parametrize(("length", "positions"), [(300, 300), (300, 700), (256, 1000), (40, 90)])
def test_blocks_equal_one_causal_attention(length: int, positions: int) -> None:
    q, k, v = _qkv(length, positions)
    with mx.stream(mx.cpu):
        blocked = fused.causal_attention(q, k, v, scale=0.25)
        whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
        np.testing.assert_allclose(np.array(blocked), np.array(whole), atol=1e-5, rtol=1e-5)


def test_each_block_reads_only_the_keys_it_can_see(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = mx.fast.scaled_dot_product_attention

    def spy(q: mx.array, k: mx.array, v: mx.array, **kwargs: Any) -> mx.array:
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(fused, "PROMPT_BLOCK", 128)
    q, k, v = _qkv(300, 700)  # a chunk at offset 400
    with mx.stream(mx.cpu):
        mx.eval(fused.causal_attention(q, k, v, scale=0.25))
    assert calls == [(128, 528), (128, 656), (44, 700)]
    calls.clear()
    monkeypatch.setattr(fused, "PROMPT_BLOCK", 0)  # MLXRUNNER_PROMPT_BLOCK=0: whole
    with mx.stream(mx.cpu):
        mx.eval(fused.causal_attention(q, k, v, scale=0.25))
    assert calls == [(300, 700)]
