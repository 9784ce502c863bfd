"""Decode steps through ``mx.compile``: each step shape's graph is traced once, then replayed.

On the GPU a decode step of many rows is bound by the host, not the device
(``bench/profile_step.py``), and at 64 rows of the 8B model building the model's graph in
Python took 1.2-1.8 ms of a 6-8 ms step. A compiled function replays the traced graph in C++
instead: the host's part of a step (``profile_step``'s dispatch) went from 5.2, 5.7 and 5.5-6.2
ms to 4.2-4.6, 4.4-5.1 and 4.8-4.9 ms at 4, 16 and 64 rows (two alternating rounds), and the
4- and 16-row steps became bound by the device.

A step is compiled only where its graph depends on nothing but its arrays and the key below:
a decode-only step whose rows attend through the decode-attention kernel (which reads each row
to its own length from the offsets array), on a model without sliding windows (their masks
depend on the step's span). The step's span then matters only through the kernel's split
count, which changes every ``MIN_SLICE`` positions. The key is the cache's shapes, the rows,
that span bucket and the tokens' dtype; a new key traces once, about the cost of one step built
in Python. Growing the cache changes its shape, so a growing step runs uncompiled, as does every
other step.

Not on the CPU: there MLX's attention reads the decode rows, and its graph depends on the span.
Reading up to the span rounded up to 256 positions, each row masked to its length, made one
trace serve them all, but SmolLM2-135M's 4- and 8-row steps then took 88 and 122 ms built in
Python and 94 and 139 ms compiled, against 78 and 108 ms as shipped (medians of three rounds
in one process): the masked attention over padding cost more than the Python it saved, and
the compiled step was slower still.

The cache's arrays go in as inputs and the updated ones come out, replacing them in the
``BatchKVCache`` before the step is evaluated: the old arrays are then held by the graph alone,
and MLX writes the new positions in place rather than copying a layer's cache (checked by
``tests/test_compiled_decode.py`` through peak memory). On CUDA the kernel writes the cache
itself and hands the same arrays back.

A model whose head shapes the kernel declines attends through MLX's masked attention, whose
graph depends on the span: after a trace in which any layer declined, nothing is compiled.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.engine.batch_cache import BatchKVCache, BatchLayout
from runtime.engine.decode_attention import MIN_SLICE

if TYPE_CHECKING:
    from runtime.models.common import CausalLM

KEEP = 16  # compiled step shapes kept (least recently used dropped): a few hundred KB each

_Key = tuple[object, ...]


def enabled() -> bool:
    """``MLXRUNNER_COMPILED_DECODE=0`` builds every step in Python (for A/B runs)."""
    return os.environ.get("MLXRUNNER_COMPILED_DECODE", "1") != "0"


def windowed(model: nn.Module) -> bool:
    """Whether any attention of ``model`` has a sliding window (its ``window`` attribute)."""
    return any(getattr(m, "window", None) is not None for _, m in model.named_modules())


class CompiledDecode:
    """The engine's flat decode steps, compiled per step shape (engine thread only)."""

    def __init__(self, model: CausalLM, cache: BatchKVCache) -> None:
        self.model = model
        self.cache = cache
        self.usable = enabled() and not windowed(model)
        self._compiled: OrderedDict[_Key, Callable[..., Any]] = OrderedDict()
        self.traces = 0  # how many step shapes were traced (tests; the bench's log)
        self._declined = False  # the last trace had a layer the kernel did not take

    def hidden(self, tokens: mx.array, layout: BatchLayout) -> mx.array:
        """``model.hidden(tokens, layout)`` for a flat decode step; compiled where it applies."""
        key = self._key(tokens, layout)
        if key is None:
            out: mx.array = self.model.hidden(tokens, layout)
            return out
        function = self._compiled.get(key)
        if function is None:
            function = self._compiled[key] = self._compile(layout)
            while len(self._compiled) > KEEP:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        cache, layers = self.cache, self.cache.num_layers
        outputs = function(tokens, layout.offsets, layout.reads, *cache.keys, *cache.values)
        if self._declined:
            # The trace attended through MLX: right for this step's span (the one traced),
            # not for the next. The model's head shapes never change: no step is compiled.
            self.usable = False
            self._compiled.clear()
        # The old arrays leave the cache before evaluation, so MLX may update them in place.
        cache.keys = list(outputs[1 : 1 + layers])
        cache.values = list(outputs[1 + layers :])
        hidden: mx.array = outputs[0]
        return hidden

    def clear(self) -> None:
        self._compiled.clear()

    def _key(self, tokens: mx.array, layout: BatchLayout) -> _Key | None:
        if not self.usable or not layout.kernel or layout.prefill or layout.mask is not None:
            return None
        shapes = []
        for array in (*self.cache.keys, *self.cache.values):
            if array is None or array.shape[0] < layout.capacity_rows:
                return None
            if array.shape[2] < layout.positions:
                return None  # this step grows the cache: built in Python
            shapes.append(array.shape)
        return (layout.rows, layout.span // MIN_SLICE, tokens.dtype, tuple(shapes))

    def _compile(self, layout: BatchLayout) -> Callable[..., Any]:
        model, layers = self.model, self.cache.num_layers
        self.traces += 1

        def step(
            tokens: mx.array, offsets: mx.array, reads: mx.array, *arrays: mx.array
        ) -> list[mx.array]:
            cache = BatchKVCache(layers)
            cache.keys = list(arrays[:layers])
            cache.values = list(arrays[layers:])
            # The traced layout keeps this step's span: any span of the same bucket splits the
            # kernel's work the same way, and the kernel reads lengths from ``reads``.
            traced = attrs.evolve(layout, cache=cache, offsets=offsets, reads=reads)
            hidden = model.hidden(tokens, traced)
            self._declined = bool(traced.declined)
            return [hidden, *cache.arrays]  # every layer's keys, then values

        return mx.compile(step)
