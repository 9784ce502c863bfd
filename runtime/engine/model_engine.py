"""``ModelEngine``: the batched, pipelined generation step on a real model (``protocol.Engine``).

Each running sequence owns a row of the padded batch KV cache (``batch_cache``). One ``step``
is one forward pass over a packed token row: one decode token for every cache row (rows that
are not decoding carry a dummy), then prefill chunks of sequences still reading their prompt
(up to ``prefill_chunk`` tokens per step in all, so decoding never stalls behind a long
prompt). The decode rows share one attention call per layer, and the whole batch is sampled
by array operations (``BatchSampler``), so a step's cost is nearly flat in the batch size.

Steps are pipelined: ``step`` dispatches forward *k* fed with the still-lazy tokens of forward
*k-1*, and only then reads forward *k-1*'s tokens (one host synchronisation per step), so the
device computes while the host routes tokens. Events therefore report the forward before the
one just dispatched; a sequence whose token turns out to end it has already been fed once
more, and that extra output is discarded.

A finished sequence keeps its row until ``remove``: the scheduler decides then whether its
computed positions become a prefix-cache entry (``save_as``). Entries are compact copies kept
here by id; the scheduler owns their index and budget (``runtime.scheduling``), and an
admitted request may start from one (``SequenceRequest.reuse``).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx

from runtime.engine.batch_cache import STEP, BatchKVCache, BatchLayout, PrefillChunk, round_up
from runtime.engine.batch_sampler import BatchSampler
from runtime.engine.compiled_decode import CompiledDecode
from runtime.engine.embedding import config_pooling, embed_tokens
from runtime.engine.protocol import EngineStats, SequenceRequest, StepAbort, TokenEvent
from runtime.engine.rows import NO_ROWS, Forward, Prefix, Row, check_request, read_events
from runtime.engine.sampling_ops import batch_logprobs
from runtime.errors import PromptTooLongError
from runtime.models.projections import fuse_projections, pretranspose_dense, projections_fused

if TYPE_CHECKING:
    from runtime.models.loader import LoadedModel


class ModelEngine:
    """Runs the sequences of one loaded model in batched steps (engine thread only)."""

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
        if projections_fused():
            fuse_projections(self.model)  # fewer matmuls per layer (the GPU step is host-bound)
            pretranspose_dense(self.model)  # and no Transpose node per matmul
        self.tokenizer = loaded.tokenizer
        self.prefill_chunk = prefill_chunk
        self._context = min(context_length or loaded.context_length, loaded.context_length)
        self._eos = loaded.tokenizer.eos_ids
        self._vocab = int(loaded.model.args.vocab_size)
        self._cache = BatchKVCache(self.model.num_layers)
        self._decode = CompiledDecode(self.model, self._cache)
        self._sampler = BatchSampler(vocab_size=self._vocab, context_length=self._context)
        self._rows: list[Row | None] = []
        self._by_id: dict[int, Row] = {}
        self._positions = 0  # cache capacity in positions (grows; reset when empty)
        self._inflight: Forward | None = None
        self._reading, self._dispatching = NO_ROWS, NO_ROWS  # see ``step``
        self._evaluating = False
        self._prefixes: dict[int, tuple[Prefix, int]] = {}
        self._prefix_bytes = 0  # kept as a total: summing every entry's arrays per step showed
        # up as 7% of the engine thread with many entries (py-spy, GPU, 64 streams)

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def kv_bytes_per_token(self) -> int:
        args = self.model.args
        embed = self.model.model.embed_tokens
        # The cache holds activations, whose dtype is the embedding's (its scales' if packed).
        dtype = getattr(embed, "scales", embed.weight).dtype
        return int(self.model.num_layers * 2 * args.kv_heads * args.dims_per_head * dtype.size)

    # ---- membership ----

    def add(self, request: SequenceRequest) -> None:
        if request.seq_id in self._by_id:
            raise ValueError(f"sequence {request.seq_id} already exists")
        check_request(request, context=self._context, vocab=self._vocab)
        index = next((i for i, r in enumerate(self._rows) if r is None), len(self._rows))
        if index == len(self._rows):
            self._rows.append(None)
        row = Row(request=request, index=index, pending=list(request.prompt))
        reuse = request.reuse
        if reuse is not None and reuse.entry_id in self._prefixes:
            prefix, stored = self._prefixes[reuse.entry_id]
            n = min(reuse.length, stored, len(request.prompt) - 1)
            if n > 0:
                self._grow(n + 1)
                for layer, (k, v) in enumerate(prefix):
                    self._cache.ensure(layer, len(self._rows), self._positions, k, v)
                self._cache.copy_in(index, prefix, n)
                row.length = n
                del row.pending[:n]
        first = request.share_prompt_of
        sibling = self._by_id.get(first) if first is not None else None
        if sibling is not None and row.length == 0 and sibling.request.prompt == request.prompt:
            row.sharing = sibling
        self._sampler.add(
            index, request.sampling, request.prompt, request.logit_bias, request.constraint
        )
        self._rows[index] = row
        self._by_id[request.seq_id] = row

    def remove(self, seq_id: int, *, save_as: int | None = None) -> int:
        """Drop a sequence; with ``save_as``, first keep its computed positions as that entry.

        Returns how many positions were kept (0 when not asked, or when the prompt was not
        fully computed: a cancelled prefill never becomes an entry).
        """
        row = self._by_id.pop(seq_id, None)
        if row is None:
            return 0
        kept = 0
        if save_as is not None and not row.pending and row.length > 0:
            self.drop_prefix(save_as)
            prefix = self._cache.copy_out(row.index, row.length)
            # Computed now (queued behind the step in flight): a copy left lazy holds the
            # whole batch buffer it reads from, long after the batch has grown or emptied.
            mx.async_eval(*(a for pair in prefix for a in pair))
            self._prefixes[save_as] = (prefix, row.length)
            self._prefix_bytes += sum(k.nbytes + v.nbytes for k, v in prefix)
            kept = row.length
        self._sampler.remove(row.index)
        self._rows[row.index] = None
        self._release_if_idle()
        return kept

    def _release_if_idle(self) -> None:
        # Rows and positions never shrink while a row is in use (the buffer is exactly
        # capacity-shaped); an empty batch gives all of its memory back at once (a forward
        # still in flight only holds rows that are gone, so its results are dropped).
        if not self._by_id:
            self._inflight = None
            self._reading = self._dispatching = NO_ROWS
            self._cache.clear()
            self._rows.clear()
            self._positions = 0

    def drop_prefix(self, entry_id: int) -> None:
        dropped = self._prefixes.pop(entry_id, None)
        if dropped is not None:
            self._prefix_bytes -= sum(k.nbytes + v.nbytes for k, v in dropped[0])

    def set_paused(self, seq_id: int, paused: bool) -> None:
        row = self._by_id.get(seq_id)
        if row is not None:
            row.paused = paused

    def has_work(self) -> bool:
        return self._inflight is not None or any(
            r.pending or r.fed_next(self._context) for r in self._by_id.values()
        )

    def statistics(self) -> EngineStats:
        prefix_bytes = self._prefix_bytes
        return EngineStats(
            active_sequences=len(self._by_id),
            prefilling_sequences=sum(1 for r in self._by_id.values() if r.pending),
            cache_bytes=self._cache.nbytes + prefix_bytes,
            prefix_bytes=prefix_bytes,
            capacity_rows=len(self._rows),
            capacity_positions=self._positions,
        )

    # ---- embeddings ----

    def embed(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        normalize: bool,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """``Engine.embed``: one packed forward of its own; the batch cache is not touched."""
        for tokens in inputs:
            if len(tokens) > self._context:
                raise PromptTooLongError.exceeding(len(tokens), self._context)
        return embed_tokens(
            self.model,
            inputs,
            vocab_size=self._vocab,
            normalize=normalize,
            dimensions=dimensions,
            pooling=config_pooling(self.loaded.config),
        )

    # ---- the step ----

    def step(self) -> list[TokenEvent]:
        previous, self._inflight = self._inflight, None
        # For ``abort_step``, should this step fail: the rows of the forward it reads back and
        # of the one it starts (``_dispatch`` records them), and whether MLX was evaluating.
        self._reading, self._dispatching = self._dispatching, NO_ROWS
        self._evaluating = False
        self._inflight = self._dispatch(previous)
        self._evaluating = True
        events = self._collect(previous) if previous is not None else []
        self._release_if_idle()
        return events

    def _grow(self, positions: int) -> None:
        self._positions = max(self._positions, round_up(positions, STEP))

    def _share_prompts(self, live: Sequence[Row]) -> None:
        """Rows waiting on a sibling whose prompt is now dispatched copy its positions but the
        last (which they compute, to sample their own first token); a sibling gone or cut
        before its prompt was computed leaves them to compute theirs."""
        for row in live:
            sibling = row.sharing
            if sibling is None:
                continue
            present = self._by_id.get(sibling.request.seq_id) is sibling
            if present and sibling.pending:
                continue  # still computing
            row.sharing = None
            n = len(row.pending) - 1
            if not present or sibling.length < n or n <= 0:
                continue  # its row may hold another sequence now
            prefix = self._cache.copy_out(sibling.index, n)
            self._grow(n + 1)
            for layer, (k, v) in enumerate(prefix):
                self._cache.ensure(layer, len(self._rows), self._positions, k, v)
            self._cache.copy_in(row.index, prefix, n)
            row.length = n
            del row.pending[:n]

    def _dispatch(self, previous: Forward | None) -> Forward | None:
        live = [r for r in self._rows if r is not None]
        self._share_prompts(live)
        fed = [r for r in live if r.fed_next(self._context)]
        chunks: list[tuple[Row, int]] = []
        budget = self.prefill_chunk
        waiting = (r for r in live if r.pending and r.sharing is None)
        for row in sorted(waiting, key=lambda r: r.request.seq_id):
            if budget <= 0:
                break
            n = min(len(row.pending), budget)
            budget -= n
            chunks.append((row, n))
        self._dispatching = (fed, chunks)
        if not fed and not chunks:
            return None
        capacity_rows = len(self._rows)
        self._grow(max([r.length + 1 for r in live] + [r.length + n for r, n in chunks]))
        inputs: list[mx.array] = []
        lengths: list[int] | None = None
        if fed:
            lengths = [r.length if r is not None else 0 for r in self._rows]
            inputs.append(self._decode_inputs(previous, capacity_rows))
        prefill: list[PrefillChunk] = []
        start = capacity_rows if fed else 0
        for row, n in chunks:
            prefill.append(PrefillChunk(start=start, length=n, row=row.index, offset=row.length))
            inputs.append(mx.array(row.pending[:n], dtype=mx.int32))
            start += n
        layout = BatchLayout.build(
            self._cache,
            capacity_rows=capacity_rows,
            positions=self._positions,
            lengths=lengths,
            decoding=[r.index for r in fed],
            prefill=prefill,
        )
        if fed and not chunks:  # one batch entry per row, flat (see ``BatchLayout``)
            hidden = self._decode.hidden(inputs[0], layout)
        else:
            tokens_in = inputs[0] if len(inputs) == 1 else mx.concatenate(inputs)
            hidden = self.model.hidden(tokens_in[None], layout)[0]
        # Rows that sample: every fed decode row, and every prompt this forward completes.
        sampled_rows: list[Row] = list(fed)
        picks = [r.index for r in fed]
        for (row, n), chunk in zip(chunks, prefill, strict=True):
            if n == len(row.pending):
                sampled_rows.append(row)
                picks.append(chunk.start + n - 1)
        for row in fed:
            row.length += 1
        prefilled: dict[int, int] = {}
        for row, n in chunks:
            del row.pending[:n]
            row.length += n
            prefilled[row.index] = n
        tokens = mx.zeros((0,), dtype=mx.int32)
        lp = None
        if sampled_rows:
            if picks != list(range(hidden.shape[0])):  # a decode-only step samples every row
                hidden = hidden[mx.array(picks)]
            logits = self.model.unembed(hidden).astype(mx.float32)
            indices = [r.index for r in sampled_rows]
            tokens = self._sampler.sample(logits, indices)
            self._sampler.accept(indices, tokens)
            for row in sampled_rows:
                row.sampled += 1
            top = max(
                (r.request.top_logprobs for r in sampled_rows if r.request.logprobs), default=-1
            )
            if top >= 0:
                lp = batch_logprobs(self._sampler.biased(logits, indices), tokens, top)
        self._evaluating = True
        mx.async_eval(tokens, *(lp or ()), *self._cache.arrays)
        return Forward(rows=tuple(sampled_rows), tokens=tokens, prefilled=prefilled, logprobs=lp)

    def _decode_inputs(self, previous: Forward | None, capacity_rows: int) -> mx.array:
        """Each row's last sampled token, a dummy for rows that do not decode.

        Tokens of ``previous`` are taken lazily (not read yet); a row that did not sample in
        it (after a failed step, or a pause) feeds its last reported token from the host.
        """
        sampled = previous.rows if previous is not None else ()
        if previous is not None and [row.index for row in sampled] == list(range(capacity_rows)):
            # Every row sampled last step, in row order (the common case): no gather, and no
            # host arrays, which cost 0.3-0.6 ms a step at 64 rows on the GPU's host.
            return previous.tokens
        where = {row.index: i for i, row in enumerate(sampled)}
        host = [r.last if r is not None and r.last is not None else 0 for r in self._rows]
        gather = [where.get(i, len(sampled) + i) for i in range(capacity_rows)]
        parts = [mx.array(host, dtype=mx.int32)]
        if previous is not None:
            parts.insert(0, previous.tokens)
        return mx.concatenate(parts)[mx.array(gather)]

    def _collect(self, forward: Forward) -> list[TokenEvent]:
        """Read a forward's samples (the step's one host sync) and turn them into events."""
        return read_events(forward, self._rows, self._by_id, eos=self._eos, context=self._context)

    def abort_step(self) -> StepAbort:
        """``Engine.abort_step``. A failure while MLX evaluated (an allocation, the device)
        loses the whole batch and every prefix entry: MLX may mark the arrays of a failed
        evaluation computed, and then they and all built on them read back made-up values
        without another error (seen with MLX 0.32 on the CPU). A failure while the forward
        was built drops the rows of the two forwards the step covers; the rest is evaluated
        now, which raises if the forward before it failed."""
        plans = (self._reading, self._dispatching)
        touched = [row for fed, chunks in plans for row in (*fed, *(r for r, _ in chunks))]
        failed = {r.request.seq_id for r in touched if self._by_id.get(r.request.seq_id) is r}
        for seq_id in failed:
            self.remove(seq_id)
        self._inflight, self._reading, self._dispatching = None, NO_ROWS, NO_ROWS
        intact = not self._evaluating
        if intact:
            prefixes = [a for prefix, _ in self._prefixes.values() for kv in prefix for a in kv]
            try:
                mx.eval(*self._cache.arrays, *self._sampler.arrays, *prefixes)
            except Exception:
                intact = False
        lost = [] if intact else list(self._prefixes)
        if not intact:
            failed.update(self._by_id)
            for seq_id in list(self._by_id):
                self.remove(seq_id)
            for entry_id in lost:
                self.drop_prefix(entry_id)
        if not self._by_id:  # its penalty windows may hold the failed forward's tokens
            self._sampler = BatchSampler(vocab_size=self._vocab, context_length=self._context)
        mx.clear_cache()
        return StepAbort(failed=tuple(sorted(failed)), lost_entries=tuple(lost))

    def close(self) -> None:
        """Release every MLX array this engine holds: the model, the caches, the prefixes.

        Called on the engine thread before it ends, so that no MLX object outlives the thread
        that used it (MLX's CUDA backend aborts at exit otherwise); the engine is unusable after.
        """
        self._inflight = None
        self._by_id.clear()
        self._rows.clear()
        self._prefixes.clear()
        self._prefix_bytes = 0
        self._cache.clear()
        self._decode.clear()  # the compiled steps hold the model's weights
        self._sampler = BatchSampler(vocab_size=self._vocab, context_length=self._context)
        self.model = self.loaded = None  # type: ignore[assignment]
        gc.collect()
        mx.synchronize()
        mx.clear_cache()
