"""The CPU engine as it ships next to each of its CPU-only measures turned off (issue 9).

- ``openblas``: ``runtime/blas.py`` sends matmuls of at most ``SKINNY_ROWS`` rows (decode
  steps) to BLIS and the rest to OpenBLAS; ``MLXRUNNER_SKINNY_ROWS=0`` keeps all on OpenBLAS.
- ``whole prompts``: ``models/fused.causal_attention`` computes a prompt chunk's attention in
  causal blocks of queries; ``MLXRUNNER_PROMPT_BLOCK=0`` computes each chunk whole.

Runs the default model converted to dense float32 (``.bench/smollm2-135m-f32``, as
``bench/http_vs_mlxlm.py`` makes it) in child processes, one per setting, in an order that
rotates every repeat, and prints the median decode step at 1, 4 and 8 rows and a 1000-token
prompt's time to its first token, with the median ratio of each setting to ``ours`` within
a repeat.

Run: ``python bench/cpu_engine.py [--repeats 3]``.
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
# Each setting's environment on top of ours.
MODES: dict[str, dict[str, str]] = {
    "ours": {},
    "openblas": {"MLXRUNNER_SKINNY_ROWS": "0"},
    "whole prompts": {"MLXRUNNER_PROMPT_BLOCK": "0"},
}


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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLXRUNNER_SKINNY_ROWS", "MLXRUNNER_PROMPT_BLOCK")
    }
    env |= MODES[mode]
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
    runs: list[dict[str, dict[str, float]]] = []
    names = list(MODES)
    for i in range(args.repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        run = {mode: child(mode, folder, args.steps) for mode in order}
        if not run["ours"]["dispatch on"]:
            parser.error("no BLIS dispatch on this machine (scripts/setup-blas.sh, build-sgemm.sh)")
        runs.append(run)
        print(f"repeat {i + 1}/{args.repeats}: " + json.dumps(run), flush=True)
    print(f"\nmedians of {args.repeats}; ratio = median of the setting's / ours within a repeat")
    others = names[1:]
    print(f"{'':36}{'ours':>9}" + "".join(f"{m:>15}{'ratio':>7}" for m in others))
    for row in runs[0]["ours"]:
        if row == "dispatch on":
            continue
        line = f"{row:36}{statistics.median(r['ours'][row] for r in runs):>9.2f}"
        for mode in others:
            value = statistics.median(r[mode][row] for r in runs)
            ratio = statistics.median(r[mode][row] / r["ours"][row] for r in runs)
            line += f"{value:>15.2f}{ratio:>7.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
