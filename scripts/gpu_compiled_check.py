"""Check that compiled decode steps compute what steps built in Python compute, on the device.

``runtime.engine.compiled_decode`` replays a traced graph that includes the decode-attention
kernel (``mx.fast.cuda_kernel``); the test suite checks the replay on the CPU with a stand-in
for the kernel, and this script checks it with the kernel itself. It builds a random llama
(``--size``, bf16; ``tiny`` runs anywhere), fills a batch cache of ``--rows`` ragged rows
through one prefill step, then runs the same decode steps twice from copies of that cache:
built in Python, and through ``CompiledDecode``. It prints the largest difference of the
hidden states and of the caches, and exits 1 unless they agree to ``--tolerance``.

Run: ``python scripts/gpu_compiled_check.py [--size 1b] [--rows 16] [--steps 8]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import random_llama


def check(size: str, rows: int, steps: int) -> tuple[float, float, int]:
    """(largest hidden difference, largest cache difference, traces) over ``steps`` steps."""
    import mlx.core as mx

    from runtime.engine.batch_cache import BatchKVCache, BatchLayout, PrefillChunk, round_up
    from runtime.engine.compiled_decode import CompiledDecode
    from runtime.models.projections import fuse_projections, pretranspose_dense

    config = random_llama.CONFIGS[size]
    loaded = random_llama.loaded_in_memory(
        config, random_llama.random_weights(config, mx.bfloat16), name=size
    )
    model = loaded.model
    fuse_projections(model)
    pretranspose_dense(model)
    lengths = [40 + 7 * r for r in range(rows)]  # ragged: every row its own length
    positions = round_up(max(lengths) + steps + 1)
    prompt = mx.random.randint(0, int(config["vocab_size"]), (sum(lengths),)).astype(mx.int32)
    cache = BatchKVCache(model.num_layers)
    chunks, start = [], 0
    for row, length in enumerate(lengths):
        chunks.append(PrefillChunk(start=start, length=length, row=row, offset=0))
        start += length
    prefill = BatchLayout.build(
        cache, capacity_rows=rows, positions=positions, lengths=None, prefill=chunks
    )
    model.hidden(prompt[None], prefill)
    mx.eval(cache.arrays)

    def copied() -> BatchKVCache:
        twin = BatchKVCache(model.num_layers)
        twin.keys = [a * 1 for a in cache.keys if a is not None]  # own buffers
        twin.values = [a * 1 for a in cache.values if a is not None]
        mx.eval(twin.arrays)
        return twin

    plain, traced = copied(), copied()
    compiled = CompiledDecode(model, traced)
    hidden_diff = cache_diff = 0.0
    for step in range(steps):
        tokens = mx.arange(rows, dtype=mx.int32) * 31 + step
        now = [length + step for length in lengths]
        outs = []
        for target in (plain, traced):
            layout = BatchLayout.build(
                target,
                capacity_rows=rows,
                positions=positions,
                lengths=now,
                decoding=range(rows),
                prefill=[],
            )
            if target is plain:
                outs.append(model.hidden(tokens, layout))
            else:
                outs.append(compiled.hidden(tokens, layout))
        mx.eval(outs, plain.arrays, traced.arrays)
        hidden_diff = max(hidden_diff, _largest_difference(*outs))
        for x, y in zip(plain.arrays, traced.arrays, strict=True):
            cache_diff = max(cache_diff, _largest_difference(x, y))
    return hidden_diff, cache_diff, compiled.traces


def _largest_difference(a: Any, b: Any) -> float:
    import mlx.core as mx
    import numpy as np

    return float(np.abs(np.array(a.astype(mx.float32) - b.astype(mx.float32))).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(random_llama.CONFIGS), default="1b")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    hidden, caches, traces = check(args.size, args.rows, args.steps)
    print(f"largest difference: hidden {hidden:g}, caches {caches:g}; {traces} trace(s)")
    if traces == 0:
        print("no step was compiled here (off CUDA, or no kernel path): nothing checked")
        return 1
    return 0 if max(hidden, caches) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
