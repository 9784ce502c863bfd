"""``ModelEngine``: the batched generation step on a real model (implements ``engine.Engine``).

Every ``step`` builds one packed forward pass over all active sequences: sequences that are
decoding contribute their last sampled token, sequences still reading their prompt contribute
the next chunk of it (up to ``prefill_chunk`` prompt tokens per step in total, so a step stays
short and cancellation is never more than one step away). Logits are computed only for rows
that need a sample: a decode token, or the last token of a prompt.

A sequence's KV cache lives in its ``_Sequence`` record; ``remove`` drops the record and with it
the cache memory. A step either completes for every sequence in it or raises; on an exception
the caches of the sequences in that step are truncated back to their last complete position,
so no half-computed prefix survives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import mlx.core as mx

from runtime.engine.protocol import (
    EngineStats,
    FinishReason,
    SequenceRequest,
    TokenEvent,
    TokenLogprob,
)
from runtime.engine.sampler import Sampler, logprobs
from runtime.errors import PromptError, PromptTooLongError
from runtime.models.common import Span

if TYPE_CHECKING:
    from runtime.engine.kvcache import SequenceCache
    from runtime.models.loader import LoadedModel


@attrs.define(eq=False)
class _Sequence:
    request: SequenceRequest
    cache: SequenceCache
    sampler: Sampler
    pending: list[int]  # prompt tokens not yet in the cache
    last: int | None = None  # the sampled token to feed next (decode phase)
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return not self.pending


@attrs.define(eq=False)
class _Work:
    """What one sequence contributes to this step's packed forward pass."""

    seq: _Sequence
    fed: int  # tokens fed
    sample: bool  # whether its last row is sampled
    prefill: bool  # prompt tokens (else its last sampled token)


@attrs.frozen(eq=False)
class _Ahead:
    """Logits of the next decode step, dispatched before this step's tokens were read."""

    logits: mx.array  # [rows, vocab]
    rows: dict[int, int]  # seq_id -> row


class ModelEngine:
    """Runs sequences of one loaded model in batched steps (engine thread only)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        prefill_chunk: int = 512,
        context_length: int | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prefill_chunk = prefill_chunk
        self._context = min(context_length or loaded.context_length, loaded.context_length)
        self._eos = loaded.tokenizer.eos_ids
        self._vocab = int(loaded.model.args.vocab_size)
        self._seqs: dict[int, _Sequence] = {}
        self._ahead: _Ahead | None = None

    @property
    def context_length(self) -> int:
        return self._context

    def add(self, request: SequenceRequest) -> None:
        if request.seq_id in self._seqs:
            raise ValueError(f"sequence {request.seq_id} already exists")
        if not request.prompt:
            raise PromptError("empty prompt")
        if len(request.prompt) >= self._context:
            raise PromptTooLongError(
                f"input length ({len(request.prompt)} tokens) exceeds the context length "
                f"({self._context} tokens)"
            )
        bad = [t for t in request.prompt if not 0 <= t < self._vocab]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{self._vocab - 1})")
        sampler = Sampler(
            request.sampling,
            prompt=request.prompt,
            vocab_size=self._vocab,
            context_length=self._context,
        )
        self._seqs[request.seq_id] = _Sequence(
            request=request,
            cache=self.model.make_cache(),
            sampler=sampler,
            pending=list(request.prompt),
        )

    def remove(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def has_work(self) -> bool:
        return bool(self._seqs)

    def statistics(self) -> EngineStats:
        return EngineStats(
            active_sequences=len(self._seqs),
            prefilling_sequences=sum(1 for s in self._seqs.values() if not s.decoding),
            cache_bytes=sum(s.cache.nbytes for s in self._seqs.values()),
        )

    def step(self) -> list[TokenEvent]:
        ahead, self._ahead = self._ahead, None
        rows = ahead.rows if ahead is not None else {}
        # Decoders whose logits the previous step already dispatched, and the rest.
        ready: list[tuple[_Sequence, mx.array]] = []
        feed: list[_Sequence] = []
        for seq in self._seqs.values():
            if not seq.decoding:
                continue
            row = rows.get(seq.request.seq_id)
            if ahead is not None and row is not None:
                ready.append((seq, ahead.logits[row]))
            else:
                feed.append(seq)
        tokens: list[int] = []
        spans: list[Span] = []
        plan: list[_Work] = []
        for seq in feed:
            assert seq.last is not None
            spans.append(Span(len(tokens), 1, seq.cache))
            tokens.append(seq.last)
            plan.append(_Work(seq, fed=1, sample=True, prefill=False))
        budget = self.prefill_chunk
        for seq in self._seqs.values():
            if seq.decoding or budget <= 0:
                continue
            n = min(len(seq.pending), budget)
            budget -= n
            spans.append(Span(len(tokens), n, seq.cache))
            tokens.extend(seq.pending[:n])
            plan.append(_Work(seq, fed=n, sample=n == len(seq.pending), prefill=True))
        if not plan and not ready:
            return []
        # Positions known complete: a dispatched-ahead position is not, until this step ends.
        before = {id(seq): seq.cache.offset - 1 for seq, _ in ready}
        before.update({id(w.seq): w.seq.cache.offset for w in plan})
        try:
            return self._run(tokens, spans, plan, ready)
        except BaseException:
            # Leave no half-written positions behind; re-feed the last token next time.
            self._ahead = None
            for seq, _ in ready:
                seq.cache.truncate(before[id(seq)])
            for w in plan:
                w.seq.cache.truncate(before[id(w.seq)])
            raise

    def _run(
        self,
        tokens: list[int],
        spans: list[Span],
        plan: list[_Work],
        ready: list[tuple[_Sequence, mx.array]],
    ) -> list[TokenEvent]:
        sampled: list[tuple[_Sequence, mx.array, _Work | None]] = []
        for seq, row_logits in ready:
            sampled.append((seq, row_logits, None))
        if plan:
            hidden = self.model.hidden(mx.array(tokens, dtype=mx.int32)[None], spans)
            rows = [sp.start + sp.length - 1 for sp, w in zip(spans, plan, strict=True) if w.sample]
            if rows:
                picked = hidden[0, mx.array(rows)] if len(rows) < len(tokens) else hidden[0]
                logits = self.model.unembed(picked).astype(mx.float32)
                for i, w in enumerate(w for w in plan if w.sample):
                    sampled.append((w.seq, logits[i], w))
        samples = []
        for seq, row_logits, _ in sampled:
            drawn = seq.sampler.sample(row_logits)
            seq.sampler.accept(drawn)
            samples.append(drawn)
        # Dispatch the next decode step now, fed with the still-lazy samples, so the model
        # computes it while this step's tokens are routed (the pipelining mlx-lm does too).
        self._ahead = self._dispatch_ahead(sampled, samples)
        pending_caches = [w.seq.cache.arrays for w in plan if not w.sample]
        to_eval = [samples, pending_caches]
        if self._ahead is not None:
            to_eval.append(self._ahead.logits)
        mx.async_eval(*to_eval)
        events: list[TokenEvent] = []
        for w in plan:
            if w.prefill:
                del w.seq.pending[: w.fed]
            if not w.sample:
                events.append(TokenEvent(seq_id=w.seq.request.seq_id, token=None, prefilled=w.fed))
        for (seq, row_logits, work), sample in zip(sampled, samples, strict=True):
            token: int = sample.item()  # type: ignore[assignment]  # an int32 scalar
            lp: TokenLogprob | None = None
            if seq.request.logprobs:
                lp = logprobs(row_logits, token, seq.request.top_logprobs)
            prefilled = work.fed if work is not None and work.prefill else 0
            events.append(self._advance(seq, token, prefilled=prefilled, lp=lp))
        mx.eval(pending_caches)
        return events

    def _dispatch_ahead(
        self, sampled: list[tuple[_Sequence, mx.array, _Work | None]], samples: list[mx.array]
    ) -> _Ahead | None:
        rows: dict[int, int] = {}
        inputs: list[mx.array] = []
        spans: list[Span] = []
        for (seq, _, _), sample in zip(sampled, samples, strict=True):
            # Sequences certain to end with this token need no next step.
            if seq.generated + 1 >= seq.request.max_tokens:
                continue
            if self._full(seq, 1):
                continue
            rows[seq.request.seq_id] = len(inputs)
            spans.append(Span(len(inputs), 1, seq.cache))
            inputs.append(sample.reshape(1))
        if not inputs:
            return None
        hidden = self.model.hidden(mx.concatenate(inputs)[None], spans)
        return _Ahead(logits=self.model.unembed(hidden[0]).astype(mx.float32), rows=rows)

    def _full(self, seq: _Sequence, extra: int) -> bool:
        """Whether prompt + generated (+ ``extra``) tokens fill the context."""
        return len(seq.request.prompt) + seq.generated + extra >= self._context

    def _advance(
        self, seq: _Sequence, token: int, *, prefilled: int, lp: TokenLogprob | None
    ) -> TokenEvent:
        seq.last = token
        seq.generated += 1
        finish: FinishReason | None = None
        if token in self._eos:
            finish = FinishReason.STOP
        elif seq.generated >= seq.request.max_tokens or self._full(seq, 0):
            finish = FinishReason.LENGTH
        if finish is not None:
            self._seqs.pop(seq.request.seq_id, None)
        return TokenEvent(
            seq_id=seq.request.seq_id, token=token, prefilled=prefilled, logprob=lp, finish=finish
        )
