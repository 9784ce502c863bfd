"""What runs once in an engine's life: kernel warm-up at load, MLX teardown at thread end."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from runtime.engine.decode_attention import MIN_SLICE
from runtime.engine.decode_attention import enabled as kernel_attention
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import SequenceRequest


def warm_up(engine: ModelEngine, progress: Callable[[float], None] | None = None) -> None:
    """Run every kind of step once so kernels compile now, not on the first request."""
    # (rows, prompt length, sampling): a long prefill and narrow and wide decode batches,
    # greedy, top-k and full-sort sampling. Kernels are specialised by such shapes; on
    # the GPU a q4 model's first 128-token prefill alone compiled for 65 s (measured).
    long = max(1, min(128, engine.prefill_chunk, engine.context_length - 8))
    # On CUDA, 4 rows of two slices' length take the split decode-attention kernel and its
    # merge, and short rows the single-pass one (runtime.engine.decode_attention); elsewhere
    # there is no such kernel and a shorter plan covers a longer span.
    split = 2 * MIN_SLICE + 8 if kernel_attention() else 150
    split = max(1, min(split, engine.context_length - 8))
    plans = [
        (1, long, SamplingOptions(temperature=0.0)),
        (4, split, SamplingOptions(temperature=0.0)),
        (4, 8, SamplingOptions()),
        (16, 4, SamplingOptions(temperature=0.7, top_k=0, top_p=0.95, seed=1)),
    ]
    seq_ids = iter(range(-1, -1000, -1))
    for done, (width, length, sampling) in enumerate(plans):
        ids = []
        for i in range(width):
            seq_id = next(seq_ids)
            ids.append(seq_id)
            prompt = tuple((7 * i + j) % engine.vocab_size for j in range(length + i % 2))
            engine.add(
                SequenceRequest(seq_id=seq_id, prompt=prompt, sampling=sampling, max_tokens=4)
            )
        while engine.has_work():
            engine.step()
        for seq_id in ids:
            engine.remove(seq_id)
        if done == len(plans) - 1:
            # Embeddings attend span by span (runtime.engine.embedding): their own kernels.
            engine.embed([[(3 * j) % engine.vocab_size for j in range(long)]], normalize=True)
        if progress is not None:
            progress((done + 1) / len(plans))


def end_mlx_thread() -> None:
    """The last MLX call of a thread that used MLX: finish its work and destroy its streams.

    MLX keeps per-thread streams whose thread-local destructors otherwise run while the
    interpreter shuts down, and abort the process ("terminate called without an active
    exception"; measured on CPU and GPU builds of MLX 0.32). ``mx.clear_streams`` is MLX's
    documented way to tear them down first.
    """
    mx.synchronize()
    mx.clear_streams()
