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

from runtime.engine import EngineStats, FinishReason, SequenceRequest, TokenEvent, TokenLogprob
from runtime.errors import PromptError
from runtime.models.common import Span
from runtime.sampler import Sampler, logprobs

if TYPE_CHECKING:
    from runtime.kvcache import SequenceCache
    from runtime.loader import LoadedModel


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

    @property
    def context_length(self) -> int:
        return self._context

    def add(self, request: SequenceRequest) -> None:
        if request.seq_id in self._seqs:
            raise ValueError(f"sequence {request.seq_id} already exists")
        if not request.prompt:
            raise PromptError("empty prompt")
        if len(request.prompt) >= self._context:
            raise PromptError(
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
        tokens: list[int] = []
        spans: list[Span] = []
        # (sequence, tokens fed this step, whether its last row is sampled)
        plan: list[tuple[_Sequence, int, bool]] = []
        for seq in self._seqs.values():
            if seq.decoding:
                assert seq.last is not None
                spans.append(Span(len(tokens), 1, seq.cache))
                tokens.append(seq.last)
                plan.append((seq, 1, True))
        budget = self.prefill_chunk
        for seq in self._seqs.values():
            if seq.decoding or budget <= 0:
                continue
            n = min(len(seq.pending), budget)
            budget -= n
            spans.append(Span(len(tokens), n, seq.cache))
            tokens.extend(seq.pending[:n])
            plan.append((seq, n, n == len(seq.pending)))
        if not plan:
            return []
        before = {id(seq): seq.cache.offset for seq, _, _ in plan}
        try:
            return self._run(tokens, spans, plan)
        except BaseException:
            # Leave no half-written positions behind for a later step or reuse.
            for seq, _, _ in plan:
                seq.cache.truncate(before[id(seq)])
            raise

    def _run(
        self, tokens: list[int], spans: list[Span], plan: list[tuple[_Sequence, int, bool]]
    ) -> list[TokenEvent]:
        hidden = self.model.hidden(mx.array(tokens, dtype=mx.int32)[None], spans)
        rows = [
            span.start + span.length - 1
            for span, (_, _, sample) in zip(spans, plan, strict=True)
            if sample
        ]
        samples: list[mx.array] = []
        logits = None
        if rows:
            picked = hidden[0, mx.array(rows)] if len(rows) < len(tokens) else hidden[0]
            logits = self.model.unembed(picked).astype(mx.float32)
            i = 0
            for seq, _, sample in plan:
                if sample:
                    samples.append(seq.sampler.sample(logits[i]))
                    i += 1
        mx.eval(samples, [seq.cache.arrays for seq, _, _ in plan])
        events: list[TokenEvent] = []
        i = 0
        for seq, n, sample in plan:
            prefilled = 0 if seq.decoding else n
            del seq.pending[:prefilled]
            if not sample:
                events.append(TokenEvent(seq_id=seq.request.seq_id, token=None, prefilled=n))
                continue
            token = int(samples[i].item())
            lp: TokenLogprob | None = None
            if seq.request.logprobs and logits is not None:
                lp = logprobs(logits[i], token, seq.request.top_logprobs)
            i += 1
            events.append(self._advance(seq, token, prefilled=prefilled, lp=lp))
        return events

    def _advance(
        self, seq: _Sequence, token: int, *, prefilled: int, lp: TokenLogprob | None
    ) -> TokenEvent:
        seq.sampler.accept(token)
        seq.last = token
        seq.generated += 1
        finish: FinishReason | None = None
        if token in self._eos:
            finish = FinishReason.STOP
        elif seq.generated >= seq.request.max_tokens or seq.cache.offset + 1 >= self._context:
            finish = FinishReason.LENGTH
        if finish is not None:
            self._seqs.pop(seq.request.seq_id, None)
        return TokenEvent(
            seq_id=seq.request.seq_id, token=token, prefilled=prefilled, logprob=lp, finish=finish
        )
