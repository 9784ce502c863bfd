"""Fault injection for tests: an engine whose chosen steps fail, a model whose chosen calls fail.

``FaultInjectingEngine`` wraps any ``Engine`` (a real ``ModelEngine`` on a tiny model, or the
actors' scripted one) and makes chosen steps raise a chosen exception. The inner step runs
first and its events are then lost, which is where a real fault costs the most: a pipelined
engine has started the next forward and read back the one before it (an MLX allocation that
fails while the host reads a forward's tokens looks the same). ``FaultyModel`` puts a fault
inside the step instead, in the model's forward pass, for engine-level tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runtime.engine.protocol import Engine, SequenceRequest, StepAbort, TokenEvent
from runtime.testing.engine_wrapper import DelegatingEngine

if TYPE_CHECKING:
    import mlx.core as mx

# Which exception, if any, step ``n`` (counted from 1) raises.
FaultPlan = Callable[[int], BaseException | None]


def at_steps(faults: Mapping[int, Callable[[], BaseException]]) -> FaultPlan:
    """Step ``n`` raises ``faults[n]()`` (a fresh exception each time); others succeed."""
    return lambda n: faults[n]() if n in faults else None


def from_step(first: int, fault: Callable[[], BaseException]) -> FaultPlan:
    """Every step from ``first`` on raises ``fault()``: a fault that keeps repeating."""
    return lambda n: fault() if n >= first else None


def out_of_memory() -> RuntimeError:
    """What MLX raises when the Metal allocator cannot give a buffer."""
    return RuntimeError(
        "[metal::malloc] Attempting to allocate 8589934592 bytes which is greater than the "
        "maximum allowed buffer size of 4294967296 bytes."
    )


def engine_bug() -> RuntimeError:
    return RuntimeError("injected engine fault")


class FaultInjectingEngine(DelegatingEngine):
    """An ``Engine`` that delegates to ``inner`` and makes the steps ``plan`` names raise.

    ``gate``: when set to an event, each step waits for it first (on the engine thread), so a
    test can line requests up before the steps it counts on. ``admission``: the exception, if
    any, that adding a sequence raises instead; ``embedding``: the same for computing
    embeddings.
    """

    def __init__(self, inner: Engine, plan: FaultPlan) -> None:
        super().__init__(inner)
        self.plan = plan
        self.gate: threading.Event | None = None
        self.admission: Callable[[SequenceRequest], BaseException | None] = lambda request: None
        self.embedding: Callable[[Sequence[Sequence[int]]], BaseException | None] = lambda inputs: (
            None
        )
        self.steps = 0
        self.failed_steps: list[int] = []
        self.aborts: list[StepAbort] = []

    def add(self, request: SequenceRequest) -> None:
        fault = self.admission(request)
        if fault is not None:
            raise fault
        self.inner.add(request)

    def embed(
        self, inputs: Sequence[Sequence[int]], *, normalize: bool, dimensions: int | None = None
    ) -> list[list[float]]:
        fault = self.embedding(inputs)
        if fault is not None:
            raise fault
        return self.inner.embed(inputs, normalize=normalize, dimensions=dimensions)

    def step(self) -> list[TokenEvent]:
        if self.gate is not None:
            self.gate.wait()
        self.steps += 1
        events = self.inner.step()
        fault = self.plan(self.steps)
        if fault is not None:
            self.failed_steps.append(self.steps)
            raise fault
        return events

    def abort_step(self) -> StepAbort:
        abort = self.inner.abort_step()
        self.aborts.append(abort)
        return abort


class FaultyModel:
    """A model whose ``fail_at``-th call of ``method`` (counted from 1) fails.

    It raises ``fault()`` there, as a bug building the forward would; or, with
    ``in_evaluation``, it returns a result whose evaluation fails later, as an allocation
    that does not fit on the device does. Everything else is the wrapped model's: give it to
    an engine as ``LoadedModel.model``.
    """

    def __init__(
        self,
        model: Any,
        *,
        method: str = "unembed",
        fail_at: int | None = None,
        fault: Callable[[], BaseException] = engine_bug,
        in_evaluation: bool = False,
    ) -> None:
        self._model = model
        self._method = method
        self.fail_at = fail_at
        self._fault = fault
        self._in_evaluation = in_evaluation
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if name != self._method:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls != self.fail_at:
                return attribute(*args, **kwargs)
            if not self._in_evaluation:
                raise self._fault()
            return attribute(*args, **kwargs) + failing_zero()

        return call


def failing_zero() -> mx.array:
    """A lazy 0 whose evaluation raises (LU factorization of a singular matrix, on the CPU)."""
    import mlx.core as mx  # here: the fault-injecting engine alone needs no MLX

    return mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0] * 0
