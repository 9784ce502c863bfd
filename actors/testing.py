"""Test harness: the actor tree with a scripted fake engine or a tiny real model, no HTTP.

``ScriptedEngine`` implements ``runtime.engine.protocol.Engine`` without MLX: each sequence
produces the tokens its script gives, one per step after a prefill in chunks, and the engine
records every call (which thread ran it, what was removed and at which step) so tests can
check the actors' behaviour. ``open_test_runner`` opens the tree around it and waits until it
is ready; its ``HarnessClient`` submits requests as the HTTP layer does.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs

from actors.config import Loaded, LoadFn
from actors.messages import Chunk, GenerateRequest, Generation, GenerationError, ModelInfo
from actors.runner import Runner
from actors.tree import open_runner
from runtime.engine.protocol import (
    Engine,
    EngineStats,
    FinishReason,
    SequenceRequest,
    StepAbort,
    TokenEvent,
)
from runtime.errors import PromptTooLongError

Script = Callable[[SequenceRequest], Sequence[int]]


def count_up(request: SequenceRequest) -> list[int]:
    """A default script: the token after the last prompt token, then +1 each step."""
    start = request.prompt[-1] + 1
    return [start + i for i in range(request.max_tokens)]


@attrs.define(eq=False)
class _Seq:
    request: SequenceRequest
    tokens: list[int]
    prefill_left: int
    produced: int = 0
    finished: bool = False  # keeps its place until ``remove``, as a real engine's row
    paused: bool = False


class ScriptedEngine:
    """A fake ``Engine``: scripted tokens, optional gate per step, optional crash at step N;
    a paused sequence computes nothing (``pauses`` records each pause and resume)."""

    def __init__(
        self,
        script: Script = count_up,
        *,
        context_length: int = 256,
        prefill_chunk: int = 8,
        eos: int | None = None,
        crash_at_step: int | None = None,
        bytes_per_token: int = 1024,
    ) -> None:
        self.script = script
        self._context = context_length
        self.prefill_chunk = prefill_chunk
        self.eos = eos
        self.crash_at_step = crash_at_step
        self.bytes_per_token = bytes_per_token
        self.seqs: dict[int, _Seq] = {}
        self.threads: set[int] = set()
        self.removed: list[int] = []
        self.removed_at_step: dict[int, int] = {}  # seq_id -> steps run before its removal
        self.added: list[int] = []
        self.pauses: list[tuple[int, bool, int]] = []  # (seq_id, paused, steps run before)
        self.aborted: list[int] = []  # sequences dropped with a failed step
        self._stepping: list[int] = []  # the sequences the last step advanced
        self.steps = 0
        self.gate: threading.Event | None = None  # when set, each step waits for it
        self.at_gate = threading.Event()  # set once a step is waiting on the gate
        self.closed = False
        self.embedded: list[tuple[tuple[tuple[int, ...], ...], int]] = []

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def kv_bytes_per_token(self) -> int:
        return self.bytes_per_token

    def _record(self) -> None:
        self.threads.add(threading.get_ident())

    def add(self, request: SequenceRequest) -> None:
        self._record()
        self.added.append(request.seq_id)
        self.last_request = request
        tokens = list(self.script(request))[: request.max_tokens]
        self.seqs[request.seq_id] = _Seq(request, tokens, prefill_left=len(request.prompt))

    def remove(self, seq_id: int, *, save_as: int | None = None) -> int:
        self._record()
        if self.seqs.pop(seq_id, None) is not None:
            self.removed.append(seq_id)
            self.removed_at_step[seq_id] = self.steps
        return 0  # no prefix cache here

    def drop_prefix(self, entry_id: int) -> None:
        self._record()

    def set_paused(self, seq_id: int, paused: bool) -> None:
        self._record()
        seq = self.seqs.get(seq_id)
        if seq is not None:
            seq.paused = paused
            self.pauses.append((seq_id, paused, self.steps))

    def close(self) -> None:
        self._record()
        self.closed = True

    def has_work(self) -> bool:
        self._record()
        return any(not s.finished and not s.paused for s in self.seqs.values())

    def statistics(self) -> EngineStats:
        self._record()
        return EngineStats(
            active_sequences=len(self.seqs),
            prefilling_sequences=sum(1 for s in self.seqs.values() if s.prefill_left),
            cache_bytes=sum(
                (len(s.request.prompt) - s.prefill_left + s.produced) * self.bytes_per_token
                for s in self.seqs.values()
            ),
        )

    def embed(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        normalize: bool,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """Scripted vectors: ``[len, sum, first]`` of each input (normalised if asked);
        ``embedded`` records each call's inputs and the steps run before it."""
        self._record()
        self.embedded.append((tuple(tuple(t) for t in inputs), self.steps))
        out = []
        for tokens in inputs:
            if len(tokens) > self._context:
                raise PromptTooLongError("input longer than the context")
            vector = [float(len(tokens)), float(sum(tokens)), float(tokens[0])][:dimensions]
            if normalize:
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                vector = [x / norm for x in vector]
            out.append(vector)
        return out

    def step(self) -> list[TokenEvent]:
        self._record()
        if self.gate is not None:
            self.at_gate.set()
            self.gate.wait()
        self.steps += 1
        self._stepping = [sid for sid, seq in self.seqs.items() if not seq.finished]
        if self.crash_at_step is not None and self.steps >= self.crash_at_step:
            raise RuntimeError(f"engine crashed at step {self.steps}")
        events = []
        for seq in list(self.seqs.values()):
            sid = seq.request.seq_id
            if seq.finished or seq.paused:
                continue
            if seq.prefill_left > self.prefill_chunk:
                seq.prefill_left -= self.prefill_chunk
                events.append(TokenEvent(seq_id=sid, token=None, prefilled=self.prefill_chunk))
                continue
            prefilled, seq.prefill_left = seq.prefill_left, 0
            if seq.produced >= len(seq.tokens):
                seq.finished = True
                continue
            token = seq.tokens[seq.produced]
            seq.produced += 1
            finish = None
            if self.eos is not None and token == self.eos:
                finish = FinishReason.STOP
            elif seq.produced >= seq.request.max_tokens or seq.produced >= len(seq.tokens):
                finish = FinishReason.LENGTH
            if finish is not None:
                seq.finished = True
            events.append(TokenEvent(seq_id=sid, token=token, prefilled=prefilled, finish=finish))
        return events

    def abort_step(self) -> StepAbort:
        """Drop every sequence the failed step advanced (even one it finished: its end was
        never reported)."""
        self._record()
        failed = tuple(sid for sid in self._stepping if sid in self.seqs)
        for sid in failed:
            del self.seqs[sid]
        self.aborted.extend(failed)
        self._stepping = []
        return StepAbort(failed=failed)


def fake_info(name: str = "fake", context_length: int = 256) -> ModelInfo:
    return ModelInfo(
        name=name,
        model_type="llama",
        context_length=context_length,
        parameters=1000,
        quantization="F32",
        chat_template=None,
        size_bytes=4000,
        digest="sha256:" + "0" * 64,
        modified_at=0.0,
        family="llama",
        embedding_length=3,  # ScriptedEngine.embed's vectors
    )


def scripted_load(engine: Engine, tokenizer: Any) -> LoadFn:
    def load(progress: Callable[[float], None]) -> Loaded:
        progress(0.5)
        return Loaded(
            engine=engine, tokenizer=tokenizer, info=fake_info(context_length=engine.context_length)
        )

    return load


def tiny_tokenizer() -> Any:
    """The tiny byte-level tokenizer trained in-process (runtime/testing/tokenizers.py)."""
    from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
    from runtime.text.tokenizer import Tokenizer

    return Tokenizer.from_parts(train_tokenizer(), tokenizer_config())


async def receive_chunk(generation: Generation) -> Chunk:
    """The next chunk of ``generation``; raises the ``GenerationError`` that ends a failed one."""
    item = await generation.chunks.receive()
    if isinstance(item, GenerationError):
        raise item
    return item


async def read_to_end(generation: Generation) -> list[Chunk]:
    """The rest of ``generation``'s chunks; raises the ``GenerationError`` that ends a failed
    one."""
    chunks = []
    async for item in generation.chunks:
        if isinstance(item, GenerationError):
            raise item
        chunks.append(item)
    return chunks


@asynccontextmanager
async def open_test_runner(
    engine: ScriptedEngine | None = None,
    *,
    tokenizer: Any = None,
    load: LoadFn | None = None,
    wait_ready: bool = True,
    **options: Any,
) -> AsyncIterator[HarnessClient]:
    """The tree around a scripted engine (default) or any ``load``; yields a ``HarnessClient``."""
    engine = engine or ScriptedEngine()
    load = load or scripted_load(engine, tokenizer or tiny_tokenizer())
    async with open_runner(load=load, **options) as runner:
        if wait_ready:
            await runner.wait_ready()
        yield HarnessClient(runner, engine)


@attrs.define(eq=False)
class HarnessClient:
    """Drives the tree like the HTTP layer would."""

    runner: Runner
    engine: ScriptedEngine

    async def generate(self, request: GenerateRequest) -> list[Chunk]:
        """Run one generation to the end and return all its chunks.

        Raises the ``GenerationError`` that ends a failed generation.
        """
        with await self.runner.submit(request) as generation:
            return await read_to_end(generation)

    async def generate_text(self, prompt: str, **kwargs: Any) -> tuple[str, Chunk]:
        chunks = await self.generate(GenerateRequest(prompt=prompt, **kwargs))
        return "".join(c.content for c in chunks), chunks[-1]

    def statistics(self) -> Any:
        return self.runner.statistics()

    def cancel_all(self) -> None:
        assert self.runner.ready is not None
        self.runner.ready.scheduler.cancel_all("cancelled by test")
