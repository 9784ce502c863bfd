"""Timed generation runs at the engine level: ours through the ``Engine`` protocol, mlx-lm's
``generate_step`` and ``BatchGenerator``, and the device's copy bandwidth.

Every run is greedy with no stop tokens, so each sequence generates exactly ``gen`` tokens.
A ``DecodeRun`` separates the prompt phase from decoding the same way for every runner: the
decode window opens when the last sequence has its first token and closes when the last one
ends; the decode rate counts only the tokens produced inside it.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING

import attrs
import mlx.core as mx

from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import Engine, SequenceRequest

if TYPE_CHECKING:
    import mlx.nn as nn

    from runtime.models.loader import LoadedModel

GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)


@attrs.frozen(kw_only=True)
class DecodeRun:
    sequences: int
    prompt_s: float  # until every sequence had its first token
    decode_tokens: int  # tokens after that
    decode_s: float

    @property
    def rate(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class _Clock:
    """Counts first tokens, then the tokens of the decode window."""

    def __init__(self, sequences: int) -> None:
        self.sequences = sequences
        self.start = time.perf_counter()
        self.started: set[int] = set()
        self.decode_from: float | None = None
        self.after = 0

    def tokens(self, seq_ids: list[int]) -> None:
        now = time.perf_counter()
        if self.decode_from is not None:
            self.after += len(seq_ids)
            return
        self.started.update(seq_ids)
        if len(self.started) == self.sequences:
            self.decode_from = now

    def result(self) -> DecodeRun:
        end = time.perf_counter()
        decode_from = self.decode_from if self.decode_from is not None else end
        return DecodeRun(
            sequences=self.sequences,
            prompt_s=decode_from - self.start,
            decode_tokens=self.after,
            decode_s=end - decode_from,
        )


def random_prompts(count: int, length: int, vocab: int, *, seed: int = 0) -> list[list[int]]:
    """Distinct prompts (no runner can share a prefix between them)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def make_engine(loaded: LoadedModel, prefill_tokens: int) -> Engine:
    """Our engine, with a prefill budget that takes every prompt in one step (as mlx-lm's
    ``BatchGenerator`` does with ``prefill_batch_size`` equal to the batch)."""
    from runtime.engine.model_engine import ModelEngine

    return ModelEngine(loaded, prefill_chunk=max(512, prefill_tokens))


def engine_decode(loaded: LoadedModel, prompts: list[list[int]], gen: int) -> DecodeRun:
    engine = make_engine(loaded, sum(len(p) for p in prompts))
    clock = _Clock(len(prompts))
    for i, prompt in enumerate(prompts):
        engine.add(SequenceRequest(seq_id=i, prompt=tuple(prompt), sampling=GREEDY, max_tokens=gen))
    while engine.has_work():
        clock.tokens([e.seq_id for e in engine.step() if e.token is not None])
    return clock.result()


def first_step_seconds(loaded: LoadedModel, prompt: list[int]) -> float:
    """Construction, admission and the first step (prefill + first token) of a new engine."""
    start = time.perf_counter()
    engine = make_engine(loaded, len(prompt))
    engine.add(SequenceRequest(seq_id=0, prompt=tuple(prompt), sampling=GREEDY, max_tokens=2))
    while not any(e.token is not None for e in engine.step()):
        pass
    return time.perf_counter() - start


def mlx_lm_single(model: nn.Module, prompt: list[int], gen: int) -> DecodeRun:
    from mlx_lm.generate import generate_step

    clock = _Clock(1)
    for _ in generate_step(mx.array(prompt), model, max_tokens=gen):
        clock.tokens([0])
    return clock.result()


def mlx_lm_batch(model: nn.Module, prompts: list[list[int]], gen: int) -> DecodeRun:
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    generator = BatchGenerator(
        model,
        max_tokens=gen,
        completion_batch_size=n,
        prefill_batch_size=n,
        prefill_step_size=max(2048, max(len(p) for p in prompts)),
    )
    try:
        clock = _Clock(n)
        generator.insert(prompts, [gen] * n)
        finished = 0
        while finished < n:
            _, responses = generator.next()
            clock.tokens([r.uid for r in responses])
            finished += sum(1 for r in responses if r.finish_reason is not None)
        return clock.result()
    finally:
        generator.close()


def copy_bandwidth(nbytes: int, *, repeats: int = 10) -> float:
    """GB/s of an elementwise read + write over ``nbytes`` of bf16 (the decode ceiling)."""
    # Two axes: one axis of more than 2**31 elements overflows MLX's int32 shapes.
    x = mx.random.uniform(shape=(nbytes // 2 // 4096, 4096), dtype=mx.bfloat16)
    mx.eval(x)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y = x * 1.5
        mx.eval(y)
        times.append(time.perf_counter() - start)
        del y
    del x
    mx.clear_cache()
    return 2 * nbytes / statistics.median(times[1:]) / 1e9
