"""The fused residual add + RMSNorm: where it applies, and the decoder stack's use of it.

The kernel itself needs MLX's CUDA backend (``bench/residual_norm.py`` checks it against MLX's
operations on the GPU); here a stand-in with its contract checks that the stack feeds every
layer the same norms in the same order, so the hidden states are those of the plain layers.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from runtime.models import decoder, residual_norm
from runtime.models.common import single_span
from runtime.models.loader import load_model
from runtime.testing.models import make_tiny_folder


def test_applies_only_on_cuda_to_half_precision_rows_it_can_load_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bf = mx.bfloat16
    assert not residual_norm.applies(mx.zeros((2, 64), bf), mx.zeros((64,), bf))  # the CPU
    monkeypatch.setattr(residual_norm, "on_cuda", lambda: True)
    assert residual_norm.applies(mx.zeros((2, 64), bf), mx.zeros((64,), bf))
    assert residual_norm.applies(mx.zeros((1, 3, 64), mx.float16), mx.zeros((64,), mx.float16))
    assert not residual_norm.applies(mx.zeros((2, 64)), mx.zeros((64,)))  # float32
    assert not residual_norm.applies(mx.zeros((2, 64), bf), mx.zeros((64,)))  # dtypes differ
    assert not residual_norm.applies(mx.zeros((2, 60), bf), mx.zeros((60,), bf))  # not 8-wide
    monkeypatch.setenv("MLXRUNNER_RESIDUAL_NORM", "0")
    assert not residual_norm.applies(mx.zeros((2, 64), bf), mx.zeros((64,), bf))


def _stand_in(
    x: mx.array, delta: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    total = x + delta
    return total, mx.fast.rms_norm(total, weight, eps)


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "phi3"])
def test_the_stack_through_fused_adds_gives_the_hidden_states_of_plain_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    model = load_model(make_tiny_folder(tmp_path / "m", architecture)).model
    tokens = mx.array([[5, 17, 99, 3, 250, 41, 7]])
    plain = model.hidden(tokens, single_span(tokens, model.make_cache()))
    calls: list[int] = []

    def counted(*args: mx.array | float) -> tuple[mx.array, mx.array]:
        calls.append(1)
        return _stand_in(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(decoder, "applies", lambda x, weight: True)
    monkeypatch.setattr(decoder, "add_rms_norm", counted)
    fused = model.hidden(tokens, single_span(tokens, model.make_cache()))
    assert len(calls) == 2 * len(model.model.layers)
    np.testing.assert_array_equal(np.array(fused), np.array(plain))
