"""Sampling for every row of the engine's batch as a handful of array operations per step.

``BatchSampler`` owns the sampling state of the batch's rows: each row's options, seed, draw
counter and window bookkeeping as host records, and its penalty window as a ring of token ids on
the device. ``sample`` builds one lazy graph for all rows and reads nothing back; the engine's
one host sync per step materializes it. The order of operations is the per-sequence
``Sampler``'s (Ollama's): a row's logit bias (OpenAI's ``logit_bias``: a sparse map of token
id -> value added to its raw logit) -> penalties over the last ``repeat_last_n`` tokens (prompt
included) -> temperature < 1e-5 is greedy -> top_k -> softmax(logits / temperature) -> typical_p -> top_p
-> min_p -> draw. A row with a grammar (structured output, ``GrammarRows``) has every token its
grammar forbids set to -inf after its penalties, so whatever it draws keeps to the grammar.

Rows are grouped by the work they need, so a batch pays only for what its rows ask: greedy rows
take an argmax; rows with a top_k take their k best candidates (a partition split in blocks,
see ``top_k``) and sort only those, rows sharing a k together; rows without a top_k sort the
whole vocabulary only when top_p or typical_p needs the order; min_p alone needs no sort.

Draws are counter-based: an exponential race (Gumbel-max) whose noise for token ``t`` at draw
``n`` of a row hashes (the row's seed, n, t), so a seeded row draws the same tokens alone or in
any batch. Statistical quality rests on one assumption: two rounds of a 32-bit integer mixer
with low avalanche bias (constants from Wellons' hash prospector), keyed by a splitmix64 of
(seed, n), make the noise of distinct (key, token) pairs behave as independent uniforms. For a
fixed key the hash is a bijection of the token id, so no two candidates of one draw share a
value. The uniforms have 23 bits, which caps the noise: a token more than ~19 nats below the
best (relative probability < 6e-9) is never drawn. ``tests/test_batch_sampler.py`` checks the
draws against softmax and the independence of consecutive draws with chi-square tests.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from runtime.engine.grammar_rows import GrammarRows
from runtime.engine.options import SamplingOptions
from runtime.engine.sampling_ops import (
    as_column,
    draw_keys,
    filter_sorted,
    log_exponential,
    top_k,
)

if TYPE_CHECKING:
    from runtime.text.structured import Constraint

_GREEDY, _TOP_K, _SORTED, _UNSORTED = range(4)

# The host record of a slot. Its penalty ring has ``ring`` columns (0: the row does not
# penalize); the last ``min(written, window)`` positions written are its window, position p in
# column p % ring. ``high`` is the most positions ever written: a rewind that needs a position
# below ``high - ring`` would need a token the ring has overwritten.
_FLOATS = ("temperature", "top_p", "min_p", "typical_p", "repeat", "presence", "frequency")
_INTS = ("top_k", "draws", "accepted", "window", "ring", "written", "high")
_ROW = np.dtype(
    [("active", np.bool_), ("path", np.int8), ("seed", np.uint64)]
    + [(name, np.float32) for name in _FLOATS]
    + [(name, np.int64) for name in _INTS]
)


class BatchSampler:
    """Sampling state of every row of the engine's batch (engine thread only).

    A row is a small slot index, reused after ``remove``. ``sample``, ``penalized`` and
    ``accept`` build lazy graphs; the bookkeeping (draw counters, window positions) is on the
    host and exact, so nothing here waits for the device.

    Args:
        vocab_size: the logits' width.
        context_length: the window of ``repeat_last_n == -1``.
        max_rewind: how many accepted tokens ``rewind`` can take back; a row's penalty ring
            keeps that many tokens beyond its window.
    """

    def __init__(self, *, vocab_size: int, context_length: int, max_rewind: int = 8) -> None:
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.max_rewind = max_rewind
        self._rows = np.zeros(0, dtype=_ROW)
        self._history = mx.zeros((0, 0), dtype=mx.int32)
        # Each biased row's (token ids, values): host arrays, a handful of entries a row.
        self._bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._grammars = GrammarRows(vocab_size)

    def add(
        self,
        row: int,
        options: SamplingOptions,
        prompt: Sequence[int],
        logit_bias: Sequence[tuple[int, float]] = (),
        constraint: Constraint | None = None,
    ) -> None:
        """Row ``row`` (a small int slot index, reused after remove) starts a sequence.

        ``logit_bias`` is added to the row's raw logits of those token ids at every step
        (ids must be in the vocabulary; a repeated id adds up). With a ``constraint``, the
        row only draws tokens its grammar allows after the tokens it accepted.
        """
        if row < 0:
            raise ValueError(f"row must be >= 0, got {row}")
        if row < self._rows.size and self._rows["active"][row]:
            raise ValueError(f"row {row} is in use")
        bias_ids = np.asarray([t for t, _ in logit_bias], dtype=np.int32)
        if bias_ids.size and (bias_ids.min() < 0 or bias_ids.max() >= self.vocab_size):
            raise ValueError(f"logit_bias ids must be in 0..{self.vocab_size - 1}")
        o = options
        window = self.context_length if o.repeat_last_n == -1 else o.repeat_last_n
        # No sequence is longer than the context, and a ring past it would only take memory
        # (repeat_last_n 2**31 - 1 asked for 8 GiB a row).
        window = min(window, self.context_length)
        penalize = window > 0 and (
            o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
        )
        ring = window + self.max_rewind if penalize else 0
        self._reserve(row + 1, ring)
        if o.greedy:
            path = _GREEDY
        elif 0 < o.top_k < self.vocab_size:
            path = _TOP_K
        elif o.top_p < 1.0 or o.typical_p < 1.0:
            path = _SORTED
        else:
            path = _UNSORTED
        recent = list(prompt)[-window:] if penalize else []
        seed = o.seed if o.seed is not None else secrets.randbits(64)
        self._rows[row] = np.zeros((), dtype=_ROW)
        record = self._rows[row : row + 1]
        record["active"] = True
        record["path"] = path
        record["temperature"] = o.temperature
        record["top_k"] = o.top_k if path == _TOP_K else 0
        record["top_p"] = o.top_p
        record["min_p"] = o.min_p
        record["typical_p"] = o.typical_p
        record["repeat"] = o.repeat_penalty
        record["presence"] = o.presence_penalty
        record["frequency"] = o.frequency_penalty
        record["seed"] = seed % (1 << 64)
        record["window"] = window if penalize else 0
        record["ring"] = ring
        record["written"] = record["high"] = len(recent)
        if recent:
            self._history[row, : len(recent)] = mx.array(recent, dtype=mx.int32)
        self._bias.pop(row, None)
        if bias_ids.size:
            values = np.asarray([b for _, b in logit_bias], dtype=np.float32)
            self._bias[row] = (bias_ids, values)
        self._grammars.remove(row)
        if constraint is not None:
            self._grammars.add(row, constraint)

    @property
    def arrays(self) -> list[mx.array]:
        """The MLX arrays it keeps between steps (the penalty windows)."""
        return [self._history]

    def remove(self, row: int) -> None:
        """Row ``row`` is free for another sequence."""
        self._check_rows([row])
        self._rows["active"][row] = False
        self._bias.pop(row, None)
        self._grammars.remove(row)

    def biased(self, logits: mx.array, rows: Sequence[int]) -> mx.array:
        """Lazy ``[R, V]`` float32: raw logits plus each row's logit bias (none: unchanged)."""
        idx = self._check_rows(rows)
        logits = logits.astype(mx.float32)
        biased = [(i, self._bias[int(row)]) for i, row in enumerate(idx) if int(row) in self._bias]
        if not biased:
            return logits
        # One scatter-add over [R, widest bias]; padding adds 0 to token 0.
        width = max(ids.size for _, (ids, _) in biased)
        ids = np.zeros((len(idx), width), dtype=np.int32)
        values = np.zeros((len(idx), width), dtype=np.float32)
        for i, (row_ids, row_values) in biased:
            ids[i, : row_ids.size] = row_ids
            values[i, : row_values.size] = row_values
        at = mx.arange(len(idx))[:, None]
        return logits.at[at, mx.array(ids)].add(mx.array(values))

    def penalized(self, logits: mx.array, rows: Sequence[int]) -> mx.array:
        """Lazy ``[R, V]`` float32: raw logits with each row's penalties (its own window)."""
        idx = self._check_rows(rows)
        logits = logits.astype(mx.float32)
        r = self._rows[idx]
        if not r["ring"].any():
            return logits
        # Repeat and presence apply once per distinct id of a row's window, frequency once per
        # occurrence; only the windows' ids are touched, never a vocabulary-wide count. Which
        # columns hold the window is host bookkeeping; only the ids are on the device.
        ring = np.maximum(r["ring"], 1)[:, None]
        written = r["written"][:, None]
        filled = np.minimum(written, r["window"][:, None])
        column = np.arange(int(ring.max()))[None]
        valid = (column < ring) & ((written - 1 - column) % ring < filled)
        # Columns outside the window read the newest id instead (one inside the window when
        # there is one), so the scatter below never writes two values to one id.
        read = np.where(valid, column, (written - 1) % ring)
        flat = read + idx[:, None] * self._history.shape[1]
        ids = self._history.reshape(-1)[mx.array(flat.astype(np.int32))]
        seen = mx.take_along_axis(logits, ids, axis=1)
        repeat = as_column(r["repeat"])
        penalized = mx.where(seen < 0, seen * repeat, seen / repeat)
        if r["presence"].any():
            penalized = penalized - as_column(r["presence"])
        windowed = filled[:, 0] > 0
        if not windowed.all():
            penalized = mx.where(as_column(windowed), penalized, seen)
        logits = mx.put_along_axis(logits, ids, penalized, axis=1)
        if r["frequency"].any():
            per_slot = mx.array(r["frequency"][:, None] * valid)
            logits = logits.at[mx.arange(len(idx))[:, None], ids].subtract(per_slot)
        return logits

    def sample(self, logits: mx.array, rows: Sequence[int]) -> mx.array:
        """Lazy int32 ``[R]``: the next token of each row.

        Args:
            logits: ``[R, V]`` raw logits (any float dtype); row i belongs to slot ``rows[i]``.
            rows: the slots sampled, each once.

        Applies each row's logit bias and penalties (its own window), its grammar's mask
        (which may read the tokens the row accepted last: see ``GrammarRows``), greedy below 1e-5 temperature, else its
        own top_k/typical_p/top_p/min_p/temperature and a draw that depends only on (the row's
        seed, its draw counter, token id). Advances the draw counter of every sampled row.
        Builds no host sync.
        """
        idx = self._check_rows(rows)
        if logits.ndim != 2 or logits.shape[0] != len(idx):
            raise ValueError(f"logits of shape {logits.shape} for {len(idx)} rows")
        if len(idx) == 0:
            return mx.zeros((0,), dtype=mx.int32)
        logits = self.penalized(self.biased(logits, rows), rows)
        if self._grammars:
            logits = self._grammars.masked(logits, idx)
        record = self._rows[idx]
        keys = draw_keys(record["seed"], record["draws"])
        self._rows["draws"][idx] += 1
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (path, k) in enumerate(zip(record["path"], record["top_k"], strict=True)):
            groups.setdefault((int(path), int(k)), []).append(i)
        if len(groups) == 1:
            ((path, k),) = groups
            return self._choose(logits, record, keys, path, k)
        picks = []
        for (path, k), members in groups.items():
            at = np.asarray(members)
            sub = logits[mx.array(at)]
            picks.append(self._choose(sub, record[at], (keys[0][at], keys[1][at]), path, k))
        order = np.concatenate([np.asarray(members) for members in groups.values()])
        return mx.concatenate(picks)[mx.array(np.argsort(order))]

    def accept(self, rows: Sequence[int], tokens: mx.array) -> None:
        """Append the (possibly still lazy) tokens ``[R]`` to those rows' penalty windows."""
        idx = self._check_rows(rows)
        if tokens.shape != (len(idx),):
            raise ValueError(f"tokens of shape {tokens.shape} for {len(idx)} rows")
        r = self._rows
        r["accepted"][idx] += 1
        if self._grammars:
            self._grammars.accept(idx, tokens)
        windowed = np.flatnonzero(r["ring"][idx])
        if windowed.size == 0:
            return
        at = idx[windowed]
        values = tokens if windowed.size == len(idx) else tokens[mx.array(windowed)]
        columns = r["written"][at] % r["ring"][at]
        self._history[mx.array(at), mx.array(columns)] = values.astype(mx.int32)
        r["written"][at] += 1
        r["high"][at] = np.maximum(r["high"][at], r["written"][at])

    def rewind(self, rows: Sequence[int], count: int = 1) -> None:
        """Undo the last ``count`` sample+accept of those rows (a failed engine step).

        Draw counters and windows go back: the next ``sample`` of a seeded row redraws what
        the undone ones drew, given the same logits.

        Raises:
            ValueError: a row has fewer than ``count`` samples or accepts, or its window would
                need tokens older than ``max_rewind`` accepts ago.
        """
        idx = self._check_rows(rows)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        r = self._rows
        for row in idx:
            if min(r["draws"][row], r["accepted"][row]) < count:
                raise ValueError(f"row {row} has fewer than {count} steps to rewind")
            start = max(0, r["written"][row] - count - r["window"][row])
            if r["ring"][row] and start < r["high"][row] - r["ring"][row]:
                raise ValueError(f"row {row} cannot rewind {count} (max_rewind {self.max_rewind})")
        for row in idx.tolist():
            self._grammars.rewind(row, count)
        r["draws"][idx] -= count
        r["accepted"][idx] -= count
        r["written"][idx] -= np.where(r["ring"][idx] > 0, count, 0)

    def _check_rows(self, rows: Sequence[int]) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        active = self._rows["active"]
        if idx.size and (idx.min() < 0 or idx.max() >= active.size or not active[idx].all()):
            raise ValueError(f"rows {list(rows)} include one that is not in use")
        return idx

    def _reserve(self, rows: int, columns: int) -> None:
        """Room for slots below ``rows`` and for rings of ``columns``."""
        have = self._rows.size
        if rows > have:
            grown = np.zeros(max(rows, 2 * have, 8), dtype=_ROW)
            grown[:have] = self._rows
            self._rows = grown
        more_rows = self._rows.size - self._history.shape[0]
        more_columns = max(0, columns - self._history.shape[1])
        if more_rows or more_columns:
            self._history = mx.pad(self._history, [(0, more_rows), (0, more_columns)])

    def _choose(
        self,
        logits: mx.array,
        record: np.ndarray,
        keys: tuple[np.ndarray, np.ndarray],
        path: int,
        k: int,
    ) -> mx.array:
        """The draws of rows that all take ``path`` (and share ``k`` on the top-k path)."""
        if path == _GREEDY:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        vocab = logits.shape[-1]
        ids: mx.array | None = None
        if path == _TOP_K and k < vocab:
            ids, logits = top_k(logits, k)
        if path in (_TOP_K, _SORTED):
            order = mx.argsort(-logits, axis=-1)
            ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
            logits = mx.take_along_axis(logits, order, axis=-1)
        temperature = as_column(record["temperature"])
        # Shifted first so that a tiny temperature gives -inf, never inf - inf = nan.
        scaled = (logits - mx.max(logits, axis=-1, keepdims=True)) / temperature
        min_p = record["min_p"]
        keep: mx.array | None = None
        if path != _UNSORTED:
            keep = filter_sorted(scaled, record["typical_p"], record["top_p"], min_p)
        elif min_p.any():
            # min_p needs no order in log space: p >= min_p * p_max (log 0: keep all).
            with np.errstate(divide="ignore"):
                keep = scaled >= as_column(np.log(min_p))
        if keep is not None:
            scaled = mx.where(keep, scaled, -mx.inf)
        candidates = ids if ids is not None else mx.arange(vocab, dtype=mx.uint32)[None]
        # Exponential race (Gumbel-max): the token whose Exp(1) clock divided by its
        # probability rings first is a draw from the probabilities.
        race = scaled - log_exponential(keys, candidates)
        pick = mx.argmax(race, axis=-1, keepdims=True)
        if ids is None:
            return pick[:, 0].astype(mx.int32)
        return mx.take_along_axis(ids, pick, axis=-1)[:, 0].astype(mx.int32)
