"""What ``ModelEngine`` keeps per sequence and per forward in flight, and how a forward's
samples become events.

A ``Row`` is one sequence's place in the batch: its cache row, the prompt tokens not yet
dispatched, and counters of what was dispatched, sampled and reported (they differ because
steps are pipelined: ``runtime.engine.model_engine``). A ``Forward`` is a dispatched pass whose
tokens are still on the device; ``read_events`` reads them back and decides each sequence's
ending (EOS, ``max_tokens``, the context). ``check_request`` refuses what no row can run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import attrs
import mlx.core as mx

from runtime.engine.protocol import FinishReason, SequenceRequest, TokenEvent, TokenLogprob
from runtime.errors import OptionsError, PromptError, PromptTooLongError

Prefix = list[tuple[mx.array, mx.array]]


@attrs.define(eq=False)
class Row:
    request: SequenceRequest
    index: int
    pending: list[int]  # prompt tokens not yet dispatched
    length: int = 0  # positions written by dispatched forwards
    sampled: int = 0  # tokens sampled by dispatched forwards
    reported: int = 0  # tokens read back and reported
    last: int | None = None  # the last token read back
    finished: bool = False
    paused: bool = False  # its reader lags: fed nothing until unpaused
    sharing: Row | None = None  # the sibling whose computed prompt it waits to copy

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    def fed_next(self, context: int) -> bool:
        """Whether the next forward feeds this row's last sampled token."""
        if self.finished or self.paused or self.pending or self.sampled == 0:
            return False
        return self.sampled < self.request.max_tokens and self.prompt_len + self.sampled < context


def check_request(request: SequenceRequest, *, context: int, vocab: int) -> None:
    """Refuse what no row can run: an empty or too long prompt, token ids outside the
    vocabulary (in the prompt or in ``logit_bias``)."""
    if not request.prompt:
        raise PromptError("empty prompt")
    if len(request.prompt) >= context:
        raise PromptTooLongError.exceeding(len(request.prompt), context)
    bad = [t for t in request.prompt if not 0 <= t < vocab]
    if bad:
        raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    bad = [t for t, _ in request.logit_bias if not 0 <= t < vocab]
    if bad:
        raise OptionsError(
            f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
        )


# The rows of a forward: those fed a decode token, and prefill chunks (row, tokens).
Plan = tuple[Sequence[Row], Sequence[tuple[Row, int]]]
NO_ROWS: Plan = ((), ())


@attrs.frozen(eq=False)
class Forward:
    """A dispatched forward pass whose samples have not been read back yet."""

    rows: tuple[Row, ...]  # the rows sampled, in the order of ``tokens``
    tokens: mx.array  # [S] int32
    prefilled: dict[int, int]  # row index -> prompt tokens this forward computed
    logprobs: tuple[mx.array, mx.array, mx.array] | None


def read_events(
    forward: Forward,
    rows: Sequence[Row | None],
    by_id: Mapping[int, Row],
    *,
    eos: Collection[int],
    context: int,
) -> list[TokenEvent]:
    """Read ``forward``'s samples (the step's one host sync) and turn them into events;
    ``rows`` and ``by_id`` are the engine's rows now (a row removed meanwhile reports nothing)."""
    tokens: list[int] = forward.tokens.tolist()  # type: ignore[assignment]
    lp_rows: tuple[list[float], list[list[int]], list[list[float]]] | None = None
    if forward.logprobs is not None:
        chosen, top_ids, top_vals = forward.logprobs
        lp_rows = (chosen.tolist(), top_ids.tolist(), top_vals.tolist())  # type: ignore[assignment]
    events: list[TokenEvent] = []
    sampled_ids = {id(r) for r in forward.rows}
    for index, n in forward.prefilled.items():
        row = rows[index] if index < len(rows) else None
        if row is None or id(row) in sampled_ids or row.request.seq_id not in by_id:
            continue
        events.append(TokenEvent(seq_id=row.request.seq_id, token=None, prefilled=n))
    for i, (row, token) in enumerate(zip(forward.rows, tokens, strict=True)):
        if row.finished or by_id.get(row.request.seq_id) is not row:
            continue  # already ended (or removed) while this forward ran
        row.reported += 1
        row.last = token
        finish: FinishReason | None = None
        if token in eos:
            finish = FinishReason.STOP
        elif row.reported >= row.request.max_tokens or (row.prompt_len + row.reported >= context):
            finish = FinishReason.LENGTH
        if finish is not None:
            row.finished = True
        logprob = None
        if lp_rows is not None and row.request.logprobs:
            k = row.request.top_logprobs
            top = tuple(zip(lp_rows[1][i][:k], lp_rows[2][i][:k], strict=True))
            logprob = TokenLogprob(token=token, logprob=lp_rows[0][i], top=top)
        events.append(
            TokenEvent(
                seq_id=row.request.seq_id,
                token=token,
                prefilled=forward.prefilled.get(row.index, 0),
                logprob=logprob,
                finish=finish,
            )
        )
    return events
