"""Engine-level decode speed on a GPU: our ``Engine`` vs mlx-lm, same weights (issue 9).

Builds a random 8B-class llama in-process (Llama-3-8B shapes; ``--tiny`` for a CPU check) in
bf16 and in q4 group 64, loads the same arrays into our model class (through the loader's
``build_model``) and into mlx-lm's, and measures side by side:

- the copy-bandwidth ceiling: an elementwise read + write (GB/s), and the batch-1 decode
  limit it implies (bandwidth / weight bytes);
- the first step of our engine after construction (kernel compilation stall), next to the
  same step once warm;
- batch-1 decode tok/s: ours vs mlx-lm's ``generate_step``;
- aggregate decode tok/s at each ``--batches`` size: ours vs mlx-lm's ``BatchGenerator``.

Prompts are random, 128 tokens, one per sequence; every sequence generates 128 tokens
greedily with no stop token. Runs alternate in order; a ratio is the median of back-to-back
ours/theirs pairs. The table also goes to ``$OUT/gpu_engine.json`` when ``OUT`` is set.
Run: ``python bench/gpu_engine.py [--dtype bf16|q4|both] [--batches 1,4,16,64] [--tiny]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import engine_runs, random_llama
from bench.engine_runs import DecodeRun

if TYPE_CHECKING:
    import mlx.nn as nn

    from runtime.models.loader import LoadedModel

Pair = dict[str, float]  # {"ours": tok/s, "theirs": tok/s}


def alternate(
    ours: Callable[[], DecodeRun], theirs: Callable[[], DecodeRun], repeats: int
) -> list[Pair]:
    pairs = []
    for i in range(repeats):
        # Alternate who goes first, so drift (clocks, other work) hits both alike.
        if i % 2:
            t, o = theirs(), ours()
        else:
            o, t = ours(), theirs()
        pairs.append({"ours": o.rate, "theirs": t.rate})
    return pairs


def summary(pairs: list[Pair]) -> dict[str, Any]:
    return {
        "ours": statistics.median(p["ours"] for p in pairs),
        "theirs": statistics.median(p["theirs"] for p in pairs),
        "ratio": statistics.median(p["ours"] / p["theirs"] for p in pairs if p["theirs"] > 0),
        "pairs": pairs,
    }


def run_dtype(dtype: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build the ``dtype`` models, measure them; their memory is freed on return."""
    import mlx.core as mx

    started = time.perf_counter()
    weights = random_llama.random_weights(config, mx.bfloat16)
    if dtype == "q4":
        weights = random_llama.quantized(weights)
    loaded = random_llama.loaded_in_memory(config, weights, name=f"random-{dtype}")
    weights.clear()  # the models hold the arrays now
    theirs = random_llama.mlx_lm_model(config, loaded.model)
    print(
        f"[{dtype}] {loaded.quantization}, "
        f"{random_llama.weight_bytes(loaded.model) / 1e9:.4g} GB of weights, "
        f"built in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    result = measure(dtype, loaded, theirs, config, args)
    result["seconds"] = time.perf_counter() - started
    return result


def measure(
    dtype: str,
    loaded: LoadedModel,
    theirs: nn.Module,
    config: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    started = time.perf_counter()
    prompts = engine_runs.random_prompts(
        max(args.batches), args.prompt_tokens, int(config["vocab_size"])
    )
    gen = args.gen_tokens
    result: dict[str, Any] = {
        "weight_bytes": random_llama.weight_bytes(loaded.model),
        "quantization": loaded.quantization,
    }
    # The first step of a fresh process pays for kernel compilation: measure it before anything.
    result["first_step_s"] = engine_runs.first_step_seconds(loaded, prompts[0])
    result["first_step_warm_s"] = engine_runs.first_step_seconds(loaded, prompts[-1])
    print(
        f"[{dtype}] first step {result['first_step_s']:.2f} s, "
        f"warm {result['first_step_warm_s']:.3f} s",
        flush=True,
    )
    rows: dict[str, Any] = {}
    engine_runs.engine_decode(loaded, prompts[:1], 4)  # warm-up: the decode shapes
    engine_runs.mlx_lm_single(theirs, prompts[0], 4)
    pairs = alternate(
        functools.partial(engine_runs.engine_decode, loaded, prompts[:1], gen),
        functools.partial(engine_runs.mlx_lm_single, theirs, prompts[0], gen),
        args.repeats,
    )
    rows["batch-1 decode tok/s (generate_step)"] = summary(pairs)
    for n in args.batches:
        batch = prompts[:n]
        engine_runs.engine_decode(loaded, batch, 3)  # warm-up: this batch's shapes
        engine_runs.mlx_lm_batch(theirs, batch, 3)
        pairs = alternate(
            functools.partial(engine_runs.engine_decode, loaded, batch, gen),
            functools.partial(engine_runs.mlx_lm_batch, theirs, batch, gen),
            args.repeats,
        )
        row = rows[f"{n} seq aggregate tok/s (BatchGenerator)"] = summary(pairs)
        print(
            f"[{dtype}] {n:>3} seq: ours {row['ours']:8.1f}  mlx-lm {row['theirs']:8.1f} tok/s"
            f"  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    result["rows"] = rows
    return result


def print_table(report: dict[str, Any]) -> None:
    bandwidth = report["bandwidth_gbs"]
    print(f"\ndevice {report['device']}, mlx {report['mlx']}, mlx-lm {report['mlx_lm']}")
    print(f"copy bandwidth (elementwise read+write): {bandwidth:.4g} GB/s")
    print(
        f"prompt {report['prompt_tokens']} tokens, {report['gen_tokens']} generated per sequence, "
        f"median of {report['repeats']}; ratio = median of back-to-back ours/mlx-lm pairs"
    )
    print(f"{'':44}{'mlxrunner':>11}{'mlx-lm':>11}{'ratio':>8}")
    for dtype, result in report["dtypes"].items():
        limit = bandwidth * 1e9 / result["weight_bytes"]
        print(
            f"{dtype}: {result['weight_bytes'] / 1e9:.4g} GB of weights, batch-1 limit "
            f"{limit:.0f} tok/s; first step {result['first_step_s']:.2f} s "
            f"(warm {result['first_step_warm_s']:.3f} s); {result['seconds']:.0f} s in all"
        )
        for label, row in result["rows"].items():
            print(f"  {label:42}{row['ours']:>11.1f}{row['theirs']:>11.1f}{row['ratio']:>8.2f}")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["bf16", "q4", "both"], default="both")
    parser.add_argument(
        "--batches", default="1,4,16,64", help="sequence counts (default 1,4,16,64)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="pairs per row (default 2)")
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU check)")
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 pair per row")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.quick:
        args.gen_tokens, args.repeats = 16, 1
    import mlx.core as mx

    config = random_llama.CONFIGS["tiny" if args.tiny else "8b"]
    bandwidth = engine_runs.copy_bandwidth((64 if args.tiny else 4096) * 2**20)
    report: dict[str, Any] = {
        "device": str(mx.default_device()),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "model": config,
        "bandwidth_gbs": bandwidth,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "dtypes": {},
    }
    print(f"copy bandwidth {bandwidth:.4g} GB/s on {report['device']}", flush=True)
    for dtype in ["bf16", "q4"] if args.dtype == "both" else [args.dtype]:
        report["dtypes"][dtype] = run_dtype(dtype, config, args)
        gc.collect()
        mx.clear_cache()
    print_table(report)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_engine.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
