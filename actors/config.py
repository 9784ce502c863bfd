"""What opening the tree takes: ``RunnerConfig``, and the contract of the load function.

``LoadFn`` runs on the engine thread and returns ``Loaded``: the engine, its tokenizer and the
model's description. ``actors.loading`` has the real one; ``actors.testing`` has scripted ones.
These records live apart from ``actors.tree`` so that neither of those modules needs the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs

from actors.messages import ModelInfo
from runtime.engine.protocol import Engine


@attrs.frozen(kw_only=True)
class Loaded:
    engine: Engine
    tokenizer: Any  # runtime.text.tokenizer.Tokenizer (or a test double with the same methods)
    info: ModelInfo


# Runs on the engine thread; reports progress in [0, 1] through the callback.
LoadFn = Callable[[Callable[[float], None]], Loaded]

# Request-sized CPU work (templating, tokenizing, big JSON bodies) holds the GIL: threads past
# the cores, or past a few with the GIL, only queue behind each other.
DEFAULT_CPU_WORKERS = min(4, os.cpu_count() or 1)


@attrs.frozen(kw_only=True)
class RunnerConfig:
    model: str = "smollm2:135m"
    models_dir: str | None = None
    execution: str = "auto"
    context_length: int | None = None
    parallel: int = 4
    prefill_chunk: int = 512
    max_queue: int = 64
    cache_gb: float = 2.0
    grace: float = 10.0
    # Generations open at once (queued, running, or still being read); more get 503.
    max_open: int = 256
    # Tokens a stream's chunk gathers before it is sent; None: by the number of running
    # streams (``pipeline.chunk_tokens``).
    stream_interval: int | None = None
    # A sequence whose reader leaves this many tokens unread pauses until it catches up...
    reader_pause_tokens: int = 256
    # ... and is cancelled (its cache freed) after this many seconds paused.
    reader_timeout: float = 60.0
    cpu_workers: int = DEFAULT_CPU_WORKERS  # worker threads for request-sized CPU work
