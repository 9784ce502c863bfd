"""Sampler: determinism, greedy equivalences, penalty math, masks, option validation."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from runtime.engine.options import SamplingOptions, options_from_dict
from runtime.errors import OptionsError
from runtime.testing.reference_sampler import Sampler, logprobs

V = 64


def _logits(seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=V).astype(np.float32) * 3)


def _item(token: mx.array) -> int:
    return int(np.array(token))


def _draws(options: SamplingOptions, n: int = 20, prompt: tuple[int, ...] = ()) -> list[int]:
    sampler = Sampler(options, prompt=prompt, vocab_size=V, context_length=256)
    out = []
    for i in range(n):
        tok = int(np.array(sampler.sample(_logits(i))))
        sampler.accept(tok)
        out.append(tok)
    return out


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    opts = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=42)
    assert _draws(opts) == _draws(opts)
    other = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=43)
    assert _draws(opts) != _draws(other)


def test_unseeded_samplers_do_not_repeat_each_other() -> None:
    opts = SamplingOptions(temperature=2.0, top_k=0, top_p=1.0)
    assert _draws(opts, 30) != _draws(opts, 30)


def test_top_k_one_equals_greedy_equals_argmax() -> None:
    greedy = _draws(SamplingOptions(temperature=0.0, repeat_penalty=1.0))
    top1 = _draws(SamplingOptions(temperature=1.0, top_k=1, repeat_penalty=1.0, seed=1))
    argmax = [int(np.argmax(np.array(_logits(i)))) for i in range(20)]
    assert greedy == top1 == argmax


def test_repeat_presence_and_frequency_penalties_follow_the_formula() -> None:
    logits = mx.array([2.0, -1.0, 1.9, 0.0] + [-5.0] * (V - 4))
    history = (0, 0, 1)
    # repeat: positive logits divided, negative multiplied, once per distinct id
    s = Sampler(
        SamplingOptions(temperature=0.0, repeat_penalty=2.0, repeat_last_n=8),
        prompt=history,
        vocab_size=V,
        context_length=64,
    )
    assert int(np.array(s.sample(logits))) == 2  # 2.0 -> 1.0 falls below 1.9
    penalized = s._penalties(logits)
    assert np.allclose(np.array(penalized[:4]), [1.0, -2.0, 1.9, 0.0])
    # presence: once per id; frequency: per occurrence
    s2 = Sampler(
        SamplingOptions(
            temperature=0.0, repeat_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25
        ),
        prompt=history,
        vocab_size=V,
        context_length=64,
    )
    assert np.allclose(
        np.array(s2._penalties(logits)[:4]), [2.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 1.9, 0.0]
    )


def test_penalty_window_counts_only_recent_tokens() -> None:
    s = Sampler(
        SamplingOptions(temperature=0.0, repeat_penalty=100.0, repeat_last_n=2),
        prompt=(0, 5, 6),
        vocab_size=V,
        context_length=64,
    )
    logits = mx.array([3.0, 2.0] + [0.0] * (V - 2))
    assert int(np.array(s.sample(logits))) == 0  # id 0 fell out of the 2-token window
    s.accept(0)
    assert int(np.array(s.sample(logits))) == 1  # now it is inside it


def test_accept_takes_lazy_tokens() -> None:
    s = Sampler(
        SamplingOptions(temperature=0.0, repeat_penalty=100.0),
        prompt=(),
        vocab_size=V,
        context_length=64,
    )
    logits = mx.array([3.0, 2.0] + [0.0] * (V - 2))
    first = s.sample(logits)
    s.accept(first)  # not evaluated yet
    assert int(np.array(s.sample(logits))) == 1


def _support(options: SamplingOptions, logits: mx.array, n: int = 400) -> set[int]:
    s = Sampler(options, prompt=(), vocab_size=logits.shape[0], context_length=64)
    return {int(np.array(s.sample(logits))) for _ in range(n)}


PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def _dist() -> mx.array:
    return mx.log(mx.array(PROBS))


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    base: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "repeat_penalty": 1.0, "seed": 3}
    assert _support(SamplingOptions(**base, top_p=0.6), _dist()) == {0, 1}
    assert _support(SamplingOptions(**base, top_p=0.75), _dist()) == {0, 1, 2}


@pytest.mark.parametrize("top_p", [1.0, 0.99])  # alone (log-space) and after top_p (sorted)
def test_min_p_drops_tokens_below_a_fraction_of_the_best(top_p: float) -> None:
    opts = SamplingOptions(
        temperature=1.0, top_k=0, top_p=top_p, min_p=0.25, repeat_penalty=1.0, seed=3
    )
    assert _support(opts, _dist()) == {0, 1, 2}  # 0.15 >= 0.25 * 0.5; 0.1 is not


def test_top_k_limits_the_candidates() -> None:
    opts = SamplingOptions(temperature=1.0, top_k=2, top_p=1.0, repeat_penalty=1.0, seed=3)
    assert _support(opts, _dist()) == {0, 1}


def _typical_reference(probs: np.ndarray, p: float) -> set[int]:
    """llama.cpp's locally typical filter, written out in numpy."""
    entropy = -np.sum(probs * np.log(probs))
    kept, mass = set(), 0.0
    for i in np.argsort(np.abs(-np.log(probs) - entropy), kind="stable"):
        kept.add(int(i))
        mass += probs[i]
        if mass >= p:
            break
    return kept


def test_typical_p_keeps_tokens_closest_to_the_entropy() -> None:
    opts = SamplingOptions(
        temperature=1.0, top_k=0, top_p=1.0, typical_p=0.5, repeat_penalty=1.0, seed=3
    )
    assert _support(opts, _dist()) == _typical_reference(np.array(PROBS), 0.5) == {0, 1, 2}
    # The likeliest token is atypical here (its surprise is far below the entropy): dropped.
    atypical_top = [0.4, 0.22, 0.2, 0.18]
    expected = _typical_reference(np.array(atypical_top), 0.5)
    assert 0 not in expected
    assert _support(opts, mx.log(mx.array(atypical_top))) == expected == {1, 2, 3}


def test_filters_chain_on_renormalized_survivors() -> None:
    # typical_p leaves {1, 2, 3} (mass 0.6); renormalized they are 0.367, 0.333, 0.3, so
    # top_p=0.5 keeps two of them. Measured against the raw probabilities, 0.22 + 0.2 < 0.5
    # would keep all three.
    opts = SamplingOptions(
        temperature=1.0, top_k=0, top_p=0.5, typical_p=0.5, repeat_penalty=1.0, seed=3
    )
    assert _support(opts, mx.log(mx.array([0.4, 0.22, 0.2, 0.18]))) == {1, 2}
    # min_p is relative to the best survivor: 0.18 >= 0.8 * 0.22 keeps token 3 as well.
    opts = SamplingOptions(
        temperature=1.0, top_k=0, top_p=1.0, typical_p=0.5, min_p=0.8, repeat_penalty=1.0, seed=3
    )
    assert _support(opts, mx.log(mx.array([0.4, 0.22, 0.2, 0.18]))) == {1, 2, 3}


def test_temperature_flattens_and_sharpens() -> None:
    base: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0, "seed": 5}
    logits = mx.array([2.0, 0.0, -2.0])
    cold = _support(SamplingOptions(**base, temperature=0.05), logits, n=200)
    hot = _support(SamplingOptions(**base, temperature=50.0), logits, n=200)
    assert cold == {0}
    assert hot == {0, 1, 2}
    tiny = SamplingOptions(**base, temperature=1e-37)  # logits / T would overflow float32
    assert _support(tiny, mx.array([300.0, 290.0, -5.0]), n=50) == {0}
    assert _support(tiny, mx.array([-5.0, 290.0, 300.0]), n=50) == {2}


def test_sample_is_a_lazy_int32_scalar_and_independent_of_the_batch() -> None:
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=9)
    alone = _draws(opts, 10)
    # Interleaved with another sequence, and with MLX's global generator reseeded: the
    # seeded sequence draws the same tokens.
    a = Sampler(opts, prompt=(), vocab_size=V, context_length=64)
    b = Sampler(
        SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=1),
        prompt=(1, 2),
        vocab_size=V,
        context_length=64,
    )
    together = []
    for i in range(10):
        mx.random.seed(1000 + i)
        ta, tb = a.sample(_logits(i)), b.sample(_logits(i + 50))
        assert isinstance(ta, mx.array)
        assert ta.dtype == mx.int32
        assert ta.shape == ()
        mx.eval(ta, tb)
        a.accept(_item(ta))
        b.accept(_item(tb))
        together.append(_item(ta))
    assert together == alone


def test_penalties_apply_to_the_whole_context_with_minus_one() -> None:
    logits = mx.array([3.0, 2.0] + [0.0] * (V - 2))
    prompt = (0,) + (5,) * 100  # id 0 is 100 tokens back
    whole = Sampler(
        SamplingOptions(temperature=0.0, repeat_penalty=100.0, repeat_last_n=-1),
        prompt=prompt,
        vocab_size=V,
        context_length=256,
    )
    recent = Sampler(
        SamplingOptions(temperature=0.0, repeat_penalty=100.0, repeat_last_n=64),
        prompt=prompt,
        vocab_size=V,
        context_length=256,
    )
    assert _item(whole.sample(logits)) == 1
    assert _item(recent.sample(logits)) == 0


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = _logits(1)
    lp = logprobs(logits, 3, 4)
    ref = np.array(logits) - np.log(np.sum(np.exp(np.array(logits))))
    assert math.isclose(lp.logprob, float(ref[3]), abs_tol=1e-5)
    assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:4])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"typical_p": 0}, "typical_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_last_n": -5}, "repeat_last_n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": float("nan")}, "seed"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 10**400}, "top_p"),
        ({"seed": "42"}, "seed"),
        ({"repeat_penalty": [1.1]}, "repeat_penalty"),
        ({"min_p": False}, "min_p"),
        ({"repeat_penalty": 0.009}, r"repeat_penalty must be >= 0\.01"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
        ({"top_p": 1e-12}, "top_p"),
        ({"typical_p": 1e-300}, "typical_p"),
        ({"temperature": 1e39}, "'temperature' is out of range"),  # float32 infinity
        ({"repeat_penalty": 1e39}, "'repeat_penalty' is out of range"),
    ],
)
def test_invalid_options_raise_clear_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        options_from_dict(options)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                                  "presence_penalty", "frequency_penalty"])  # fmt: skip
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_option_refuses_nan_and_infinities(name: str, value: float) -> None:
    with pytest.raises(OptionsError, match=name):
        options_from_dict({name: value})
    direct: dict[str, Any] = {name: value}  # built directly, as `mlxrunner run` does
    with pytest.raises(OptionsError, match=name):
        SamplingOptions(**direct)


def test_a_temperature_below_1e_5_is_greedy() -> None:
    assert SamplingOptions(temperature=0.0).greedy
    assert SamplingOptions(temperature=9.9e-6).greedy
    assert not SamplingOptions(temperature=1e-5).greedy
    floors = SamplingOptions(repeat_penalty=0.01, top_p=1e-9, typical_p=1e-9)  # the lowest
    assert floors.repeat_penalty == 0.01


def test_from_dict_ignores_other_options_and_maps_negative_seed() -> None:
    opts = SamplingOptions.from_dict(
        {"temperature": 0, "num_predict": 5, "stop": ["x"], "seed": -1}
    )
    assert opts.temperature == 0.0
    assert opts.seed is None
    assert options_from_dict({"seed": 7, "top_k": 3.0}).top_k == 3
    defaults = SamplingOptions()
    assert options_from_dict({"temperature": None, "top_k": None}) == defaults
    assert options_from_dict({"temperature": 1}).temperature == 1.0
    with pytest.raises(OptionsError, match="object"):
        options_from_dict(["temperature", 1])  # type: ignore[arg-type]
