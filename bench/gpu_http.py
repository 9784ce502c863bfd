"""Aggregate decode through HTTP next to the engine-level figure, same run (GPU, issue 9).

Writes a random 8B-class llama folder in bf16 under ``.bench/`` (``--tiny``: a small one, for
a CPU check), measures our engine on it in-process at each concurrency level (or takes those
figures from a ``gpu_engine.py`` JSON with ``--engine-json``), frees that, then serves the
folder with ``mlxrunner serve --parallel 64`` and sends the same prompts as concurrent
streaming ``/completion`` requests (token-id prompts, greedy, ``num_predict`` tokens each).
Reports, per level, the HTTP aggregate decode tok/s, the engine's, and their ratio; and the
latency of the first request once ``/health`` answers ok (the server's compile stall), next to
the same request once warm. Also written to ``$OUT/gpu_http.json`` when ``OUT`` is set.
Run: ``python bench/gpu_http.py [--levels 1,4,16,64] [--tiny] [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import engine_runs, random_llama
from bench.http_client import run_concurrently, stream_native, window_rate
from bench.servers import (
    ROOT,
    ServerProcess,
    child_env,
    exit_on_sigterm,
    free_port,
    mlxrunner_command,
    open_servers,
)

BENCH_DIR = ROOT / ".bench"


def engine_level(
    folder: Path, prompts: list[list[int]], levels: list[int], gen: int
) -> dict[int, float]:
    """Our engine's aggregate decode tok/s per level, on the folder as the server loads it."""
    import mlx.core as mx

    from runtime.models.loader import load_model

    loaded = load_model(folder)
    rates: dict[int, float] = {}
    for n in levels:
        engine_runs.engine_decode(loaded, prompts[:n], 3)  # warm-up: this batch's shapes
        rates[n] = engine_runs.engine_decode(loaded, prompts[:n], gen).rate
        print(f"engine {n:>3} seq: {rates[n]:8.1f} tok/s", flush=True)
    del loaded
    gc.collect()
    mx.clear_cache()
    return rates


def engine_from_json(path: Path, levels: list[int]) -> dict[int, float]:
    rows = json.loads(path.read_text())["dtypes"]["bf16"]["rows"]
    return {n: float(rows[f"{n} seq aggregate tok/s (BatchGenerator)"]["ours"]) for n in levels}


def body(prompt: list[int], gen: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "options": {"temperature": 0.0, "repeat_penalty": 1.0, "num_predict": gen},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--levels", default="1,4,16,64", help="concurrent streams (default 1,4,16,64)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--engine-json", type=Path, default=None, help="gpu_engine.py's JSON")
    parser.add_argument("--cache-gb", type=float, default=32.0, help="the server's KV bound")
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU check)")
    parser.add_argument("--quick", action="store_true", help="16 tokens per stream")
    parser.add_argument("--stream-interval", default=None, help="the server's flag, if given")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",") if n]
    if args.quick:
        args.gen_tokens = 16
    exit_on_sigterm()

    size = "tiny" if args.tiny else "8b"
    folder = random_llama.bf16_folder(size, BENCH_DIR)
    vocab = int(random_llama.CONFIGS[size]["vocab_size"])
    prompts = engine_runs.random_prompts(max(levels), args.prompt_tokens, vocab)
    if args.engine_json is not None:
        engine = engine_from_json(args.engine_json, levels)
    else:
        engine = engine_level(folder, prompts, levels, args.gen_tokens)

    report: dict[str, Any] = {"model": folder.name, "levels": {}}
    with open_servers() as servers:
        port = free_port()
        # 64 sequences of 256 positions take ~2.1 GB of bf16 KV: above the default --cache-gb.
        flags = ["--parallel", str(max(levels)), "--cache-gb", str(args.cache_gb)]
        if args.stream_interval is not None:
            flags += ["--stream-interval", args.stream_interval]
            report["stream_interval"] = args.stream_interval
        command = mlxrunner_command(folder, port, *flags)
        server = ServerProcess.start(
            "ours", command, port, BENCH_DIR / "logs" / "gpu_http.log", child_env()
        )
        servers.append(server)
        report["ready_s"] = server.wait_ready(600)
        # The first request after /health says ok pays for whatever the load left to compile.
        report["first_request_s"] = _latency(port, prompts[0])
        report["warm_request_s"] = _latency(port, prompts[-1])
        print(
            f"ready in {report['ready_s']:.1f} s; first request {report['first_request_s']:.2f} s, "
            f"warm {report['warm_request_s']:.3f} s",
            flush=True,
        )
        for n in levels:
            bodies = [body(p, args.gen_tokens) for p in prompts[:n]]
            run_concurrently(stream_native, port, [body(p, 3) for p in prompts[:n]])  # warm-up
            started = time.perf_counter()
            records = run_concurrently(stream_native, port, bodies)
            wall = time.perf_counter() - started
            short = sum(1 for r in records if r.tokens < args.gen_tokens)
            report["levels"][n] = {
                "http": window_rate(records),
                "engine": engine[n],
                "end_to_end": sum(r.tokens for r in records) / wall,
                "ended_early": short,
            }
            row = report["levels"][n]
            print(
                f"http {n:>3} streams: {row['http']:8.1f} tok/s ({short} ended early)", flush=True
            )
        report["exit_status"] = server.stop()
    print_table(report, args)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_http.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


def _latency(port: int, prompt: list[int]) -> float:
    started = time.perf_counter()
    stream_native(port, body(prompt, 8))
    return time.perf_counter() - started


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{report['model']}: prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated "
        f"per stream; server ready in {report['ready_s']:.1f} s, first request "
        f"{report['first_request_s']:.2f} s (warm {report['warm_request_s']:.3f} s), "
        f"exit status {report['exit_status']}"
    )
    print(
        f"{'streams':>8}{'HTTP tok/s':>12}{'engine tok/s':>14}{'HTTP/engine':>13}{'end-to-end':>12}"
    )
    for n, row in report["levels"].items():
        ratio = row["http"] / row["engine"] if row["engine"] else 0.0
        print(
            f"{n:>8}{row['http']:>12.1f}{row['engine']:>14.1f}{ratio:>13.2f}{row['end_to_end']:>12.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
