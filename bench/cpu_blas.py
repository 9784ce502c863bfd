"""The CPU engine with and without the few-row BLAS dispatch, side by side (issue 9).

``runtime/blas.py`` sends matmuls of at most ``SKINNY_ROWS`` rows (decode steps) to BLIS and
the rest (prefill chunks) to OpenBLAS. This runs the default model converted to dense float32
(``.bench/smollm2-135m-f32``, as ``bench/http_vs_mlxlm.py`` makes it) in child processes that
alternate between the dispatch (``ours``) and OpenBLAS alone (``MLXRUNNER_SKINNY_ROWS=0``),
and prints the median decode step at 1, 4 and 8 rows and a 1000-token prefill, with the
ratio of each back-to-back pair.

Run: ``python bench/cpu_blas.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = (1, 4, 8)
PREFILL = 1000
MODES = {"dispatch": None, "openblas": "0"}


def measure(folder: Path, steps: int) -> dict[str, float]:
    """In this process: step times (ms) by batch rows, then one prefill (s)."""
    import runtime  # noqa: F401  (BLAS before mlx)
    from bench import engine_runs
    from runtime.blas import skinny_blas
    from runtime.engine.model_engine import ModelEngine
    from runtime.engine.protocol import SequenceRequest
    from runtime.models.loader import load_model

    loaded = load_model(folder)
    out: dict[str, float] = {"dispatch on": float(skinny_blas() is not None)}
    for rows in ROWS:
        engine = ModelEngine(loaded)
        for i in range(rows):
            prompt = tuple(range(100 + i, 164 + i))
            request = SequenceRequest(
                seq_id=i, prompt=prompt, sampling=engine_runs.GREEDY, max_tokens=steps + 20
            )
            engine.add(request)
        for _ in range(6):  # prefill, first tokens, the pipeline full
            engine.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        out[f"decode step, {rows} rows (ms)"] = 1000 * statistics.median(times)
        engine.close()
    engine = ModelEngine(loaded)
    prompt = tuple(range(100, 100 + PREFILL))
    engine.add(SequenceRequest(seq_id=0, prompt=prompt, sampling=engine_runs.GREEDY, max_tokens=2))
    start = time.perf_counter()
    while not any(event.token is not None for event in engine.step()):
        pass  # prefill chunks report no token; the first token ends the prompt's time
    out[f"prefill {PREFILL} tokens (s)"] = time.perf_counter() - start
    engine.close()
    return out


def child(mode: str, folder: Path, steps: int) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("MLXRUNNER_SKINNY_ROWS", None)
    if MODES[mode] is not None:
        env["MLXRUNNER_SKINNY_ROWS"] = str(MODES[mode])
    command = [sys.executable, __file__, "--child", str(folder), "--steps", str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per size")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps)))
        return 0
    from bench.http_vs_mlxlm import BENCH_DIR, converted_model

    folder = converted_model(BENCH_DIR / "smollm2-135m-f32")
    pairs: list[dict[str, dict[str, float]]] = []
    for i in range(args.repeats):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        pair = {mode: child(mode, folder, args.steps) for mode in order}
        if not pair["dispatch"]["dispatch on"]:
            parser.error("no BLIS dispatch on this machine (scripts/setup-blas.sh, build-sgemm.sh)")
        pairs.append(pair)
        print(f"repeat {i + 1}/{args.repeats}: " + json.dumps(pair), flush=True)
    print(f"\nmedians of {args.repeats}; ratio = median of dispatch/OpenBLAS pairs (lower: faster)")
    print(f"{'':32}{'dispatch':>10}{'OpenBLAS':>10}{'ratio':>8}")
    for row in pairs[0]["dispatch"]:
        if row == "dispatch on":
            continue
        ours = statistics.median(p["dispatch"][row] for p in pairs)
        theirs = statistics.median(p["openblas"][row] for p in pairs)
        ratio = statistics.median(p["dispatch"][row] / p["openblas"][row] for p in pairs)
        print(f"{row:32}{ours:>10.2f}{theirs:>10.2f}{ratio:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
