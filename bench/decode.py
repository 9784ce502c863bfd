"""Prefill and decode speed of this runtime vs mlx-lm's ``generate_step``, side by side.

Both run the default model (SmolLM2-135M-Instruct from its GGUF) with the same weights and the
same execution mode (what ``auto`` picks here), greedy, the same prompt, interleaved runs; the
ratio column is ours / mlx-lm's. Run: ``make bench`` or ``.venv/bin/python bench/decode.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx)
from bench.common import BENCH_TEXT, default_gguf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="also measure N sequences together")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    from runtime.engine.model_engine import ModelEngine
    from runtime.engine.options import SamplingOptions
    from runtime.engine.protocol import SequenceRequest
    from runtime.formats.gguf import read_gguf, write_folder
    from runtime.models.loader import load_model

    gguf = default_gguf()
    loaded = load_model(gguf)
    print(f"model {gguf.name}: execution={loaded.execution} device={mx.default_device()}")
    ids = loaded.tokenizer.encode(BENCH_TEXT * 4)
    prompt = ids[: args.prompt_tokens]
    assert len(prompt) == args.prompt_tokens, "bench text too short"
    greedy = SamplingOptions(temperature=0.0, repeat_penalty=1.0)

    with tempfile.TemporaryDirectory() as tmp:
        write_folder(read_gguf(gguf), Path(tmp), dequantize=loaded.execution == "dense")
        ref_model, _ = mlx_lm_load(tmp)[:2]

    def ours(batch: int = 1) -> tuple[float, float]:
        engine = ModelEngine(loaded, prefill_chunk=max(512, args.prompt_tokens * batch))
        for i in range(batch):
            engine.add(
                SequenceRequest(
                    seq_id=i,
                    prompt=tuple(prompt),
                    sampling=greedy,
                    max_tokens=args.gen_tokens + 10_000,
                )
            )
        start = time.perf_counter()
        engine.step()  # whole prompt(s) in one step, first token sampled
        first = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            engine.step()
        end = time.perf_counter()
        return batch * len(prompt) / (first - start), batch * (args.gen_tokens - 1) / (end - first)

    def theirs() -> tuple[float, float]:
        gen = generate_step(mx.array(prompt), ref_model, max_tokens=args.gen_tokens)
        start = time.perf_counter()
        next(gen)
        first = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            next(gen)
        end = time.perf_counter()
        return len(prompt) / (first - start), (args.gen_tokens - 1) / (end - first)

    ours()
    theirs()  # warm-up (compilation, allocator)
    rows_o, rows_t = [], []
    for i in range(args.repeats):
        # Alternate who goes first: this machine is shared, and its speed drifts.
        if i % 2:
            rows_t.append(theirs())
            rows_o.append(ours())
        else:
            rows_o.append(ours())
            rows_t.append(theirs())
    po, do = (statistics.median(r[i] for r in rows_o) for i in (0, 1))
    pt, dt = (statistics.median(r[i] for r in rows_t) for i in (0, 1))
    # The ratio is the median of ratios of runs taken back to back, which cancels drift.
    pr, dr = (
        statistics.median(o[i] / t[i] for o, t in zip(rows_o, rows_t, strict=True)) for i in (0, 1)
    )
    print(f"prompt {len(prompt)} tokens, generate {args.gen_tokens}, median of {args.repeats}")
    print(f"{'':10}{'mlxrunner':>12}{'mlx-lm':>12}{'ratio':>8}")
    print(f"{'prefill':10}{po:>10.1f}/s{pt:>10.1f}/s{pr:>8.2f}")
    print(f"{'decode':10}{do:>10.1f}/s{dt:>10.1f}/s{dr:>8.2f}")
    if args.batch > 1:
        bp, bd = ours(args.batch)
        print(
            f"batch of {args.batch}: prefill {bp:.1f} tok/s, decode {bd:.1f} tok/s aggregate "
            f"({bd / do:.2f}x single-sequence decode)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
