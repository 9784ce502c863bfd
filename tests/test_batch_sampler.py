"""BatchSampler: equivalence with the per-sequence Sampler, batch independence of seeded rows,
the draws' distribution, the filters' supports, rewind, and batched logprobs."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from runtime.engine.batch_sampler import BatchSampler
from runtime.engine.options import SamplingOptions
from runtime.engine.sampling_ops import batch_logprobs, log_exponential, top_k
from runtime.testing.reference_sampler import Sampler, logprobs

V = 64
PLAIN: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0}


def _logits(key: int, step: int, vocab: int = V) -> np.ndarray:
    """The logits a sequence ``key`` sees at ``step``, whatever batch it is in."""
    return np.random.default_rng([key, step]).normal(size=vocab).astype(np.float32) * 3


def _tokens(array: mx.array) -> list[int]:
    return [int(t) for t in np.array(array)]


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    s = BatchSampler(vocab_size=V, context_length=64)
    s.add(0, SamplingOptions(temperature=0.0, repeat_penalty=1.0), [1, 2])
    s.add(1, SamplingOptions(seed=1), [3])
    s.add(2, SamplingOptions(temperature=0.0, repeat_penalty=1.0), [])
    logits = np.stack([_logits(i, 0) for i in range(3)])
    picked = _tokens(s.sample(mx.array(logits), [0, 1, 2]))
    assert picked[0] == int(np.argmax(logits[0]))
    assert picked[2] == int(np.argmax(logits[2]))


OPTION_SETS: list[dict[str, Any]] = [
    {"repeat_penalty": 1.3, "repeat_last_n": 8},
    {"repeat_penalty": 0.7, "repeat_last_n": 3, "presence_penalty": 0.5},
    {"repeat_penalty": 1.0, "frequency_penalty": 0.4, "repeat_last_n": 16},
    {"repeat_penalty": 1.5, "presence_penalty": -0.3, "frequency_penalty": 1.5},
    {"repeat_penalty": 2.0, "repeat_last_n": -1},
    {"repeat_penalty": 2.0, "repeat_last_n": 0},  # off
    {"repeat_penalty": 1.0},  # off
    {"repeat_penalty": 3.0, "repeat_last_n": 4},  # an empty prompt: the window starts empty
]


def test_penalized_logits_and_greedy_tokens_equal_the_per_sequence_sampler() -> None:
    # Several windows wrap the ring (more tokens than window + max_rewind); the histories
    # repeat ids (small vocabulary slice) so that distinct-vs-occurrence counting matters.
    s = BatchSampler(vocab_size=V, context_length=40, max_rewind=2)
    olds = []
    for row, extra in enumerate(OPTION_SETS):
        opts = SamplingOptions(temperature=0.0, **extra)
        size = 5 + 3 * row if row < len(OPTION_SETS) - 1 else 0
        prompt = [int(t) for t in np.random.default_rng(row).integers(0, 12, size=size)]
        s.add(row, opts, prompt)
        olds.append(Sampler(opts, prompt=prompt, vocab_size=V, context_length=40))
    rows = list(range(len(OPTION_SETS)))
    for step in range(30):
        raw = mx.array(np.stack([_logits(r, step) for r in rows]))
        expected = [
            old._penalties(raw[i]) if old._penalize else raw[i] for i, old in enumerate(olds)
        ]
        assert np.allclose(
            np.array(s.penalized(raw, rows)), np.array(mx.stack(expected)), atol=1e-5
        )
        tokens = s.sample(raw, rows)
        assert _tokens(tokens) == [int(np.array(old.sample(raw[i]))) for i, old in enumerate(olds)]
        # Both accept a few re-used ids (the batch sampler a still lazy array).
        s.accept(rows, tokens % 12)
        for i, old in enumerate(olds):
            old.accept(_tokens(tokens)[i] % 12)


def test_a_reused_row_forgets_the_previous_window() -> None:
    opts = SamplingOptions(temperature=0.0, repeat_penalty=100.0, repeat_last_n=8)
    s = BatchSampler(vocab_size=V, context_length=64)
    s.add(3, opts, [0, 0, 0])
    s.remove(3)
    s.add(3, opts, [5])
    logits = mx.array([[3.0, 2.0] + [0.0] * (V - 2)])
    assert _tokens(s.sample(logits, [3])) == [0]


TARGET = SamplingOptions(seed=1234)  # Ollama's defaults: top_k 40, top_p 0.9, penalties
COMPANIONS = [
    SamplingOptions(temperature=0.0),
    SamplingOptions(seed=5, top_k=7, top_p=0.5),
    SamplingOptions(seed=6, top_k=0, top_p=0.8, typical_p=0.9),
    SamplingOptions(top_k=0, top_p=1.0, min_p=0.05, frequency_penalty=0.3),
    SamplingOptions(seed=1, temperature=1.5, top_k=40, typical_p=0.7, min_p=0.02),
    SamplingOptions(seed=2, repeat_last_n=-1, presence_penalty=1.0),
]


def _run(layout: list[int | None], steps: int = 12, vocab: int = 4096) -> list[int]:
    """The target's tokens when it sits at slot ``layout.index(None)`` among companions.

    At this vocabulary a top-k group of one or two rows partitions whole rows and a group of
    three splits them in blocks (``top_k``): the draws must not tell the difference.
    """
    s = BatchSampler(vocab_size=vocab, context_length=128)
    keys = []
    for slot, who in enumerate(layout):
        opts = TARGET if who is None else COMPANIONS[who]
        key = -1 if who is None else who
        s.add(
            slot * 2 + 1,
            opts,
            [int(t) for t in np.random.default_rng(key + 7).integers(0, vocab, 9)],
        )
        keys.append(key)
    rows = [slot * 2 + 1 for slot in range(len(layout))]
    out = []
    for step in range(steps):
        raw = mx.array(np.stack([_logits(k + 100, step, vocab) for k in keys]))
        tokens = s.sample(raw, rows)
        s.accept(rows, tokens)
        out.append(_tokens(tokens)[layout.index(None)])
    return out


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch() -> None:
    alone = _run([None])
    assert len(set(alone)) > 3  # it really samples
    assert _run([0, None, 1]) == alone
    assert _run([5, 4, 3, 2, 1, 0, None]) == alone
    assert _run([None, 2, 3, 4]) == alone
    assert _run([1, 4, None]) == alone


def test_unseeded_rows_differ() -> None:
    s = BatchSampler(vocab_size=V, context_length=64)
    opts = SamplingOptions(temperature=2.0, **PLAIN)
    s.add(0, opts, [])
    s.add(1, opts, [])
    raw = mx.array(np.stack([_logits(0, 0)] * 2))
    draws = [_tokens(s.sample(raw, [0, 1])) for _ in range(30)]
    assert [a for a, _ in draws] != [b for _, b in draws]


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


# Critical value of chi-square at p = 0.001: the seeds are fixed, so a pass is deterministic;
# a biased or correlated noise source would exceed it by far with this many draws.
CHI2_999 = {3: 16.27, 7: 24.32, 15: 37.70}


@pytest.mark.parametrize(
    ("options", "keep"),
    [
        ({"temperature": 1.0, **PLAIN}, 8),  # full vocabulary, unsorted
        ({"temperature": 0.6, **PLAIN}, 8),
        ({"temperature": 1.0, **PLAIN, "top_k": 4}, 4),  # top-k candidates
        ({"temperature": 1.3, **PLAIN, "top_p": 0.999999}, 8),  # full vocabulary, sorted
    ],
)
def test_draws_follow_the_softmax(options: dict[str, Any], keep: int) -> None:
    # Eight live tokens at ids spread over the vocabulary.
    vocab = 64
    live = np.array([3, 9, 17, 30, 41, 50, 58, 63])
    values = np.array([1.0, 0.5, 0.0, -0.3, -0.8, -1.2, -1.5, -2.0], dtype=np.float32)
    row = np.full(vocab, -1e9, dtype=np.float32)
    row[live] = values
    rows, steps = 100, 80
    s = BatchSampler(vocab_size=vocab, context_length=64)
    for r in range(rows):
        s.add(r, SamplingOptions(seed=r, **options), [])
    raw = mx.array(np.tile(row, (rows, 1)))
    counts = np.zeros(keep)
    position = {int(t): i for i, t in enumerate(live)}
    for _ in range(steps):
        for t in _tokens(s.sample(raw, range(rows))):
            counts[position[t]] += 1
    scaled = np.exp(values[:keep] / options["temperature"])
    statistic = _chi_square(counts, scaled / scaled.sum())
    print(statistic)
    assert statistic < CHI2_999[keep - 1]


def test_the_noise_is_uniform_over_a_large_vocabulary() -> None:
    # The noise of every id of the default model's vocabulary, for a few keys, mapped back to
    # its uniform (u = exp(-E) for E ~ Exp(1)): 64 equal bins.
    ids = mx.arange(49_152, dtype=mx.uint32)[None]
    uniform = np.concatenate(
        [np.array(mx.exp(-mx.exp(log_exponential(_key(k), ids)))).reshape(-1) for k in range(4)]
    )
    counts = np.bincount((uniform * 64).astype(int), minlength=64)
    assert _chi_square(counts, np.full(64, 1 / 64)) < 103.4  # p = 0.001, 63 degrees


def _key(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array([k * 0x9E3779B9 & 0xFFFFFFFF], np.uint32), np.array([k + 1], np.uint32)


def test_consecutive_draws_are_independent() -> None:
    # Pairs (draw n, draw n + 1) of a row over four equally likely tokens: 16 equal cells.
    s = BatchSampler(vocab_size=4, context_length=64)
    rows = 128
    for r in range(rows):
        s.add(r, SamplingOptions(seed=10_000 + r, temperature=1.0, **PLAIN), [])
    raw = mx.zeros((rows, 4))
    draws = np.array([_tokens(s.sample(raw, range(rows))) for _ in range(41)])
    pairs = (draws[:-1] * 4 + draws[1:]).reshape(-1)
    counts = np.bincount(pairs, minlength=16)
    assert _chi_square(counts, np.full(16, 1 / 16)) < CHI2_999[15]


PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
ATYPICAL_TOP = [0.4, 0.22, 0.2, 0.18]
FILTER_CASES: list[tuple[dict[str, Any], list[float], set[int]]] = [
    ({"top_p": 0.6}, PROBS, {0, 1}),
    ({"top_p": 0.75}, PROBS, {0, 1, 2}),
    ({"min_p": 0.25}, PROBS, {0, 1, 2}),  # alone: log space, no sort
    ({"min_p": 0.25, "top_p": 0.99}, PROBS, {0, 1, 2}),  # after top_p: sorted
    ({"top_k": 2}, PROBS, {0, 1}),
    ({"top_k": 3, "top_p": 0.6}, PROBS, {0, 1}),
    ({"typical_p": 0.5}, PROBS, {0, 1, 2}),
    ({"typical_p": 0.5}, ATYPICAL_TOP, {1, 2, 3}),  # the likeliest token is atypical
    ({"typical_p": 0.5, "top_p": 0.5}, ATYPICAL_TOP, {1, 2}),  # chained on survivors
    ({"typical_p": 0.5, "min_p": 0.8}, ATYPICAL_TOP, {1, 2, 3}),
    ({}, PROBS, {0, 1, 2, 3, 4}),
]


def test_filters_never_pick_a_token_they_exclude() -> None:
    # Every case in one batch, each with many seeded rows: the groups must not leak into
    # each other.
    s = BatchSampler(vocab_size=5, context_length=64)
    rows, expected, logits = [], [], []
    copies = 30
    for case, (extra, probs, support) in enumerate(FILTER_CASES):
        options = {"temperature": 1.0, **PLAIN, **extra}
        for c in range(copies):
            row = case * copies + c
            s.add(row, SamplingOptions(seed=row, **options), [])
            rows.append(row)
            expected.append(support)
            logits.append(np.log(np.array(probs + [1e-12] * (5 - len(probs)))))
    raw = mx.array(np.stack(logits).astype(np.float32))
    seen: list[set[int]] = [set() for _ in FILTER_CASES]
    for _ in range(15):
        for i, t in enumerate(_tokens(s.sample(raw, rows))):
            seen[i // copies].add(t)
    assert seen == [support for _, _, support in FILTER_CASES]


def test_a_tiny_temperature_is_greedy_without_nan() -> None:
    s = BatchSampler(vocab_size=3, context_length=64)
    for r, extra in enumerate([PLAIN, {**PLAIN, "top_p": 0.9}, {**PLAIN, "top_k": 2}]):
        s.add(r, SamplingOptions(seed=r, **{**extra, "temperature": 1e-37}), [])
    raw = mx.array([[300.0, 290.0, -5.0], [-5.0, 290.0, 300.0], [290.0, 300.0, -5.0]])
    for _ in range(10):
        assert _tokens(s.sample(raw, [0, 1, 2])) == [0, 2, 1]


def test_a_temperature_below_greedy_temperature_is_the_argmax() -> None:
    # Two logits one float32 step apart: divided by 5e-6 they differ by 0.02 nats, so a
    # sampled row picks either about half the time; a greedy one always takes the first.
    near = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    raw = mx.array([[1.0, near] + [-10.0] * (V - 2)] * 2)
    s = BatchSampler(vocab_size=V, context_length=64)
    s.add(0, SamplingOptions(seed=1, temperature=5e-6, **PLAIN), [])
    s.add(1, SamplingOptions(seed=2, temperature=1e-46, **PLAIN), [])  # 0 in float32
    picks = [_tokens(s.sample(raw, [0, 1])) for _ in range(40)]
    assert picks == [[0, 0]] * 40


def test_a_penalty_window_past_the_context_is_the_context() -> None:
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, V, 200)]
    s = BatchSampler(vocab_size=V, context_length=100, max_rewind=2)
    for row, window in enumerate([10**6, -1]):
        opts = SamplingOptions(temperature=0.0, repeat_penalty=100.0, repeat_last_n=window)
        s.add(row, opts, prompt)
    assert s._history.shape[1] == 100 + 2  # not a ring of a million columns per row
    raw = mx.array(np.stack([_logits(0, 0)] * 2))
    assert np.array_equal(np.array(s.penalized(raw, [0])), np.array(s.penalized(raw, [1])))


def test_rewind_restores_draw_counters_and_windows() -> None:
    s = BatchSampler(vocab_size=V, context_length=64, max_rewind=2)
    opts = SamplingOptions(seed=3, temperature=1.5, top_k=0, repeat_penalty=3.0, repeat_last_n=4)
    s.add(0, opts, [1, 2, 3, 4, 5, 6])
    s.add(1, SamplingOptions(temperature=0.0, frequency_penalty=2.0), [7, 7])
    rows = [0, 1]
    steps = [mx.array(np.stack([_logits(0, i), _logits(1, i)])) for i in range(4)]
    first = []
    for raw in steps[:2]:
        tokens = s.sample(raw, rows)
        s.accept(rows, tokens)
        first.append(_tokens(tokens))
    penalized = np.array(s.penalized(steps[2], rows))
    tokens = s.sample(steps[2], rows)
    s.accept(rows, tokens)
    third = _tokens(tokens)
    s.rewind(rows)
    assert np.array_equal(np.array(s.penalized(steps[2], rows)), penalized)
    redo = s.sample(steps[2], rows)
    assert _tokens(redo) == third
    s.accept(rows, redo)
    s.rewind(rows, 2)
    again = s.sample(steps[1], rows)
    assert _tokens(again) == first[1]
    s.accept(rows, again)
    for raw in steps[2:]:
        s.accept(rows, s.sample(raw, rows))
    with pytest.raises(ValueError, match="max_rewind"):
        s.rewind(rows, 3)  # row 0's window would need a token its ring overwrote
    with pytest.raises(ValueError, match="fewer than"):
        s.rewind(rows, 5)


@pytest.mark.parametrize(
    ("vocab", "k"), [(49_152, 40), (50_001, 40), (49_152, 1), (3000, 7), (64, 40)]
)
def test_the_split_top_k_finds_the_k_largest(vocab: int, k: int) -> None:
    # Eight rows make the split pay (and recurse on the block maxima at 49152); the last row
    # has only three finite values, so -inf and padding fill its k.
    values = np.random.default_rng(vocab + k).normal(size=(8, vocab)).astype(np.float32)
    values[-1] = -np.inf
    values[-1, [5, vocab // 2, vocab - 1]] = [1.0, 2.0, 3.0]
    ids, top = top_k(mx.array(values), k)
    ids_np, top_np = np.array(ids), np.array(top)
    assert ids_np.shape == (8, k)
    assert ids_np.max() < vocab
    assert np.array_equal(np.take_along_axis(values, ids_np, axis=1), top_np)
    expected = -np.sort(-values, axis=1)[:, :k]
    assert np.array_equal(-np.sort(-top_np, axis=1), expected)
    assert len(set(ids_np[0].tolist())) == k


def test_rows_must_be_in_use() -> None:
    s = BatchSampler(vocab_size=V, context_length=64)
    s.add(2, SamplingOptions(), [])
    with pytest.raises(ValueError, match="in use"):
        s.add(2, SamplingOptions(), [])
    with pytest.raises(ValueError, match="not in use"):
        s.sample(mx.zeros((1, V)), [0])
    s.remove(2)
    with pytest.raises(ValueError, match="not in use"):
        s.accept([2], mx.array([1]))
    assert s.sample(mx.zeros((0, V)), []).shape == (0,)


@pytest.mark.parametrize("top", [0, 3, V + 5])
def test_batch_logprobs_match_the_per_row_logprobs(top: int) -> None:
    raw = mx.array(np.stack([_logits(r, 9) for r in range(3)])).astype(mx.float16)
    tokens = mx.array([5, 0, V - 1], dtype=mx.int32)
    chosen, ids, values = batch_logprobs(raw, tokens, top)
    assert ids.shape == values.shape == (3, min(top, V))
    assert ids.dtype == mx.int32
    for r in range(3):
        ref = logprobs(raw[r], _tokens(tokens)[r], top)
        assert math.isclose(float(np.array(chosen)[r]), ref.logprob, abs_tol=1e-5)
        # The same values in the same order; each id carries its own logprob (float16 logits
        # tie, and tied ids may come in either order).
        assert np.allclose(np.array(values[r]), [v for _, v in ref.top], atol=1e-5)
        full = logprobs(raw[r], 0, V)
        by_id = dict(full.top)
        assert len(set(_tokens(ids[r]))) == ids.shape[1]
        assert np.allclose([by_id[t] for t in _tokens(ids[r])], np.array(values[r]), atol=1e-5)


def test_logit_bias_applies_per_row_to_greedy_and_sampled_rows() -> None:
    s = BatchSampler(vocab_size=V, context_length=64)
    s.add(0, SamplingOptions(temperature=0.0, repeat_penalty=1.0), [1], [(5, 100.0)])
    s.add(1, SamplingOptions(seed=3, **PLAIN), [1], [(7, 100.0), (7, 0.5)])
    s.add(2, SamplingOptions(temperature=0.0, repeat_penalty=1.0), [1])
    logits = np.stack([_logits(i, 0) for i in range(3)])
    assert _tokens(s.sample(mx.array(logits), [0, 1, 2])) == [5, 7, int(np.argmax(logits[2]))]
    biased = np.array(s.biased(mx.array(logits), [0, 1, 2]))
    assert biased[1, 7] == pytest.approx(logits[1, 7] + 100.5)  # repeated ids add up
    np.testing.assert_array_equal(biased[2], logits[2])
    # A banned argmax is never picked; a reused slot forgets the old bias.
    s.remove(0)
    s.add(0, SamplingOptions(temperature=0.0, repeat_penalty=1.0), [1], [(5, -100.0)])
    logits[0, 5] = 50.0
    assert _tokens(s.sample(mx.array(logits[:1]), [0]))[0] != 5
    with pytest.raises(ValueError, match="logit_bias"):
        s.add(3, SamplingOptions(), [1], [(V, 1.0)])
