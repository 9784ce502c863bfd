"""Per-step sampling time: the per-row ``Sampler`` loop vs ``BatchSampler``, side by side.

Every row uses Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over
the last 64 tokens) with its own seed and a 64-token prompt. One step is sample + accept for
all rows, measured to the end of ``mx.eval`` on the tokens; both sides see the same logits,
already on the device. Run: ``.venv/bin/python bench/sampler.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx)


def _seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=49152, help="the default model's vocabulary")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import mlx.core as mx
    import numpy as np

    from runtime.engine.batch_sampler import BatchSampler
    from runtime.engine.options import SamplingOptions
    from runtime.testing.reference_sampler import Sampler

    vocab, context = args.vocab, 2048
    rng = np.random.default_rng(0)
    print(f"V={vocab}, Ollama defaults, device={mx.default_device()}, median of {args.repeats}")
    print(f"{'rows':>5} {'Sampler loop':>14} {'BatchSampler':>14} {'speed-up':>9}")
    for rows in args.rows:
        logits = mx.array(rng.normal(size=(rows, vocab)).astype(np.float32) * 3)
        prompts = [rng.integers(0, vocab, size=64).tolist() for _ in range(rows)]
        options = [SamplingOptions(seed=r) for r in range(rows)]
        mx.eval(logits)

        per_row = [
            Sampler(o, prompt=p, vocab_size=vocab, context_length=context)
            for o, p in zip(options, prompts, strict=True)
        ]
        row_logits = [logits[r] for r in range(rows)]

        def loop_step(
            samplers: list[Sampler] = per_row, inputs: list[mx.array] = row_logits
        ) -> None:
            tokens = [s.sample(x) for s, x in zip(samplers, inputs, strict=True)]
            for s, t in zip(samplers, tokens, strict=True):
                s.accept(t)
            mx.eval(tokens)

        batch = BatchSampler(vocab_size=vocab, context_length=context)
        for r, (o, p) in enumerate(zip(options, prompts, strict=True)):
            batch.add(r, o, p)
        slots = list(range(rows))

        def batch_step(
            sampler: BatchSampler = batch, x: mx.array = logits, slots: list[int] = slots
        ) -> None:
            tokens = sampler.sample(x, slots)
            sampler.accept(slots, tokens)
            mx.eval(tokens)

        for _ in range(3):  # warm-up, and fill both penalty windows past the prompt
            loop_step()
            batch_step()
        # Interleaved, so that a busy machine slows both sides alike.
        times = [(_seconds(loop_step), _seconds(batch_step)) for _ in range(args.repeats)]
        old = statistics.median(t for t, _ in times)
        new = statistics.median(t for _, t in times)
        print(f"{rows:>5} {old * 1e3:>11.2f} ms {new * 1e3:>11.2f} ms {old / new:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
