"""``DelegatingEngine``: an ``Engine`` that hands every call to the engine it wraps.

Test engines that change one or two calls (inject faults, pace steps, record threads)
subclass it and override only those, so a member added to the ``Engine`` protocol is passed
through once here rather than in every wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.engine.protocol import Engine, EngineStats, SequenceRequest, StepAbort, TokenEvent


class DelegatingEngine:
    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    @property
    def kv_bytes_per_token(self) -> int:
        return self.inner.kv_bytes_per_token

    def add(self, request: SequenceRequest) -> None:
        self.inner.add(request)

    def remove(self, seq_id: int, *, save_as: int | None = None) -> int:
        return self.inner.remove(seq_id, save_as=save_as)

    def drop_prefix(self, entry_id: int) -> None:
        self.inner.drop_prefix(entry_id)

    def set_paused(self, seq_id: int, paused: bool) -> None:
        self.inner.set_paused(seq_id, paused)

    def has_work(self) -> bool:
        return self.inner.has_work()

    def step(self) -> list[TokenEvent]:
        return self.inner.step()

    def abort_step(self) -> StepAbort:
        return self.inner.abort_step()

    def statistics(self) -> EngineStats:
        return self.inner.statistics()

    def embed(
        self, inputs: Sequence[Sequence[int]], *, normalize: bool, dimensions: int | None = None
    ) -> list[list[float]]:
        return self.inner.embed(inputs, normalize=normalize, dimensions=dimensions)

    def close(self) -> None:
        self.inner.close()
