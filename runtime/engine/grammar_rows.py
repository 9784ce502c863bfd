"""The grammar state of the batch's constrained rows (structured output), for ``BatchSampler``.

Each constrained row has a matcher (``runtime.text.structured.Constraint.start``) that must see
every token the row accepts before the row's next mask can be computed. The engine pipelines
its steps (the tokens of forward k-1 are still lazy when forward k is built), so a row's last
token is kept lazy here and read only when the next mask is needed: ``masked`` first starts the
device on the step's logits (``mx.async_eval``), then reads the previous tokens (they were
computed before this forward, which is fed them), advances the matchers and computes their
masks with numpy while the device runs the forward, then applies all masks as one array
operation. Rows without a constraint cost nothing, and a batch without one costs one check.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np

from runtime.text.structured import Constraint


class GrammarRows:
    """Matchers of the constrained rows, by slot (engine thread only).

    Args:
        vocab_size: the logits' width (a model may have more rows than its tokenizer has
            tokens: those are never allowed to a constrained row).
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._matchers: dict[int, llguidance.LLMatcher] = {}
        self._eos: dict[int, np.ndarray] = {}
        self._widths: dict[int, int] = {}
        # A row's last accepted token, not read yet: (the lazy tokens of its forward, index).
        self._pending: dict[int, tuple[mx.array, int]] = {}
        self._executor: llguidance.LLExecutor | None = None

    def add(self, row: int, constraint: Constraint) -> None:
        self.remove(row)
        self._matchers[row] = constraint.start()
        self._eos[row] = np.asarray(sorted(constraint.eos_ids), dtype=np.int64)
        self._widths[row] = constraint.vocab_size

    def remove(self, row: int) -> None:
        self._matchers.pop(row, None)
        self._eos.pop(row, None)
        self._widths.pop(row, None)
        self._pending.pop(row, None)

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def accept(self, rows: np.ndarray, tokens: mx.array) -> None:
        """The (lazy) tokens ``[R]`` rows ``rows`` just drew; read at their next mask."""
        for i, row in enumerate(rows.tolist()):
            if row in self._matchers:
                if row in self._pending:  # not masked since (a direct caller)
                    self._read_pending([row])
                self._pending[row] = (tokens, i)

    def rewind(self, row: int, count: int) -> None:
        """Take back the row's last ``count`` accepted tokens."""
        matcher = self._matchers.get(row)
        if matcher is None or count <= 0:
            return
        if self._pending.pop(row, None) is not None:
            count -= 1
        if count and not matcher.rollback(count):
            raise ValueError(f"row {row} cannot rewind its grammar by {count}")

    def masked(self, logits: mx.array, rows: np.ndarray) -> mx.array:
        """``logits`` ``[R, V]`` with every token a constrained row's grammar forbids at -inf."""
        at = [i for i, row in enumerate(rows.tolist()) if row in self._matchers]
        if not at:
            return logits
        constrained = [int(rows[i]) for i in at]
        if any(row in self._pending for row in constrained):
            mx.async_eval(logits)  # the forward runs while the host works out the masks
            self._read_pending(constrained)
        width = max(self._widths[row] for row in constrained)
        bitmask = llguidance.numpy.allocate_token_bitmask(len(at), width)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        matchers = [(self._matchers[row], k) for k, row in enumerate(constrained)]
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        for k, row in enumerate(constrained):
            if self._matchers[row].is_error():
                # A token outside the grammar got in (nothing else can follow): end the row.
                words = bitmask[k].view(np.uint32)
                words[:] = 0
                for token in self._eos[row].tolist():
                    words[token // 32] |= np.uint32(1 << (token % 32))
        allowed = _unpack(mx.array(bitmask), self.vocab_size)
        if len(at) < logits.shape[0]:
            # Free rows take an all-true row (index C); no in-place write: the caller's
            # logits array is also the one its logprobs are read from.
            everything = mx.ones((1, self.vocab_size), dtype=mx.bool_)
            which = np.full(logits.shape[0], len(at), dtype=np.int32)
            which[at] = np.arange(len(at), dtype=np.int32)
            allowed = mx.concatenate([allowed, everything])[mx.array(which)]
        return mx.where(allowed, logits, -mx.inf)

    def _read_pending(self, rows: Sequence[int]) -> None:
        """Advance the matchers of ``rows`` by their pending tokens (one read per forward)."""
        read: dict[int, list[int]] = {}
        for row in rows:
            pending = self._pending.pop(row, None)
            if pending is None:
                continue
            tokens, i = pending
            if id(tokens) not in read:
                read[id(tokens)] = tokens.tolist()  # type: ignore[assignment]
            self._matchers[row].consume_token(read[id(tokens)][i])


def _unpack(bitmask: mx.array, vocab_size: int) -> mx.array:
    """Bool ``[R, vocab_size]`` from llguidance's bitmask ``[R, W]`` (bit j of word w is token
    32w + j); tokens past the mask's width are not allowed."""
    shifts = mx.arange(32, dtype=mx.uint32)
    bits = (bitmask.astype(mx.uint32)[:, :, None] >> shifts) & 1
    allowed = bits.reshape(bitmask.shape[0], -1).astype(mx.bool_)
    have = allowed.shape[1]
    if have >= vocab_size:
        return allowed[:, :vocab_size]
    return mx.pad(allowed, [(0, 0), (0, vocab_size - have)], constant_values=False)
