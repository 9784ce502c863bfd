"""``mlxrunner serve`` vs ``mlx_lm.server`` through HTTP, side by side (CPU, issue 9).

Both servers load the same folder: the default model (SmolLM2-135M-Instruct) converted once
from its GGUF to dense float32 under ``.bench/`` (our CPU default). Ours runs on Debian's
OpenBLAS with decoding's few-row products sent to BLIS (``runtime/blas.py``); ``mlx_lm.server``
gets OpenBLAS through ``LD_PRELOAD`` (``--their-blas openblas``, the default), or our whole
set-up (``--their-blas ours``), which shows how much of a ratio is the BLAS and how much the
server. Both stay up for the whole run on
two loopback ports; every measurement is taken for both servers back to back, in alternating
order, and the ratio column is the median of those pairs (this machine is shared and its
speed drifts). Requests are streaming ``/v1/completions``, temperature 0, the same prompt
and ``max_tokens`` for both; each prompt starts with a marker of its own so no server can
answer it from a cache, except where the prefix hit is the point.

Rows: decode tok/s of one stream; aggregate decode tok/s of 4 and 8 concurrent streams;
time to first token (TTFT) of a ~1000-token prompt (cold); TTFT of the same prefix with a
different ending after the prefix was served once; and the prefix-hit / cold TTFT of each
server. Both servers get ``repeat_penalty`` 1.0 (ours defaults to Ollama's 1.1, mlx-lm to none).
Run: ``make bench-http`` or ``python bench/http_vs_mlxlm.py [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx, here and for the LD_PRELOAD it reports)
from bench.common import BENCH_TEXT, default_gguf
from bench.http_client import run_concurrently, stream_openai, window_rate
from bench.servers import (
    ROOT,
    ServerProcess,
    child_env,
    dispatch_preload,
    exit_on_sigterm,
    free_port,
    mlx_lm_command,
    mlxrunner_command,
    open_servers,
    openblas_preload,
)

BENCH_DIR = ROOT / ".bench"
# Two endings of the long prefix (a question and "Answer:" made the model stop at once).
ENDINGS = (
    "\n\nThe next morning, the clockmaker",
    "\n\nMany years later, one of the children",
)


def converted_model(out: Path) -> Path:
    """The default GGUF as a dense float32 mlx-lm folder, written once (runtime's own writer)."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import mlx.core as mx

    from runtime.formats.gguf import read_gguf, write_folder

    tmp = out.with_name(out.name + ".partial")
    write_folder(read_gguf(default_gguf()), tmp, dequantize=True, dtype=mx.float32)
    tmp.rename(out)
    return out


def long_prefix(folder: Path, tokens: int) -> str:
    """Text of about ``tokens`` tokens of the model's tokenizer."""
    from runtime.formats.model_files import folder_files
    from runtime.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model_files(folder_files(folder))
    ids = tokenizer.encode(BENCH_TEXT * (tokens // 100 + 2))
    return tokenizer.decode(ids[:tokens])


class Bench:
    """The measurements; each runs against one server (its port) and returns {row: value}."""

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.prefix = prefix
        self.serial = 0

    def marker(self) -> str:
        # A fresh first line per request: a cached prompt would make TTFT and prefill free.
        self.serial += 1
        return f"Story {self.serial}.\n"

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        # repeat_penalty: our OpenAI route applies Ollama's default (1.1), mlx-lm applies none.
        return {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "repeat_penalty": 1.0,
        }

    def warm_up(self, port: int) -> None:
        stream_openai(port, self.body(self.marker() + BENCH_TEXT, 4))

    def single(self, port: int) -> dict[str, float]:
        body = self.body(self.marker() + BENCH_TEXT, self.args.gen_tokens)
        return {"decode 1 stream tok/s": stream_openai(port, body).decode_rate}

    def concurrent(self, port: int, streams: int) -> dict[str, float]:
        bodies = [
            self.body(self.marker() + BENCH_TEXT, self.args.gen_tokens) for _ in range(streams)
        ]
        rate = window_rate(run_concurrently(stream_openai, port, bodies))
        return {f"decode {streams} streams tok/s": rate}

    def ttft(self, port: int) -> dict[str, float]:
        """Cold TTFT, then the same long prefix with another ending (a prefix hit)."""
        prefix = self.marker() + self.prefix
        cold = stream_openai(port, self.body(prefix + ENDINGS[0], 4)).ttft
        hit = stream_openai(port, self.body(prefix + ENDINGS[1], 4)).ttft
        return {
            f"cold TTFT s ({self.args.prefix_tokens} tok)": cold,
            "prefix-hit TTFT s": hit,
            "prefix-hit / cold TTFT": hit / cold,
        }


Rows = dict[str, list[dict[str, float]]]  # row -> one {server: value} per repeat


def measure_pair(
    rows: Rows, fn: Callable[[int], dict[str, float]], ports: dict[str, int], first: str
) -> None:
    """Run ``fn`` on both servers back to back, ``first`` first; add the pair to ``rows``."""
    order = [first, *[name for name in ports if name != first]]
    results = {name: fn(ports[name]) for name in order}
    for row in results[first]:
        pair = {name: results[name][row] for name in ports}
        rows.setdefault(row, []).append(pair)
        print(f"  {row:<32}" + "".join(f"{n:>8} {v:9.3f}" for n, v in pair.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short run to check the script")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per row (default 3)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="max_tokens of decode runs")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="long prompt length")
    parser.add_argument("--streams", default="4,8", help="concurrency levels (default 4,8)")
    parser.add_argument(
        "--their-blas",
        choices=("openblas", "ours"),
        default="openblas",
        help="BLAS given to mlx_lm.server: OpenBLAS, or ours with the BLIS dispatch",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.gen_tokens, args.prefix_tokens = 1, 16, 300
    levels = [int(s) for s in args.streams.split(",") if s]
    exit_on_sigterm()

    folder = converted_model(BENCH_DIR / "smollm2-135m-f32")
    preload, variables = openblas_preload(), None
    if args.their_blas == "ours":
        dispatch = dispatch_preload()
        if dispatch is None:
            parser.error(
                "this machine has no BLIS dispatch to give (scripts/setup-blas.sh, build-sgemm.sh)"
            )
        preload, variables = dispatch
    print(f"model {folder} (dense float32); LD_PRELOAD for mlx_lm.server: {preload}")
    bench = Bench(args, long_prefix(folder, args.prefix_tokens))
    rows: Rows = {}
    logs = BENCH_DIR / "logs"
    with open_servers() as servers:
        port = free_port()
        parallel = str(max([1, *levels]))
        command = mlxrunner_command(folder, port, "--parallel", parallel)
        servers.append(ServerProcess.start("ours", command, port, logs / "ours.log", child_env()))
        port = free_port()
        command = mlx_lm_command(folder, port)
        env = child_env(preload=preload, variables=variables)
        servers.append(ServerProcess.start("mlx-lm", command, port, logs / "mlx_lm.log", env))
        for server in servers:
            print(f"{server.name} ready in {server.wait_ready(300):.1f} s on port {server.port}")
        ports = {server.name: server.port for server in servers}
        for port in ports.values():
            bench.warm_up(port)  # the first request pays for compilation and allocation

        for i in range(args.repeats):
            first = "ours" if i % 2 == 0 else "mlx-lm"
            print(f"repeat {i + 1}/{args.repeats} ({first} first)", flush=True)
            measure_pair(rows, bench.single, ports, first)
            for n in levels:
                measure_pair(rows, functools.partial(bench.concurrent, streams=n), ports, first)
            measure_pair(rows, bench.ttft, ports, first)
    print_table(rows, args)
    out = BENCH_DIR / "http_vs_mlxlm.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"raw pairs: {out}")
    return 0


def print_table(rows: Rows, args: argparse.Namespace) -> None:
    print(
        f"\nmedians of {args.repeats}; ratio = median of back-to-back ours/theirs pairs "
        "(tok/s: higher is better; TTFT: lower is better)"
    )
    print(f"{'':32}{'mlxrunner':>12}{'mlx-lm':>12}{'ratio':>8}")
    for label, pairs in rows.items():
        ours = statistics.median(p["ours"] for p in pairs)
        theirs = statistics.median(p["mlx-lm"] for p in pairs)
        ratios = [p["ours"] / p["mlx-lm"] for p in pairs if p["mlx-lm"] > 0]
        ratio = f"{statistics.median(ratios):>8.2f}" if ratios else f"{'-':>8}"
        print(f"{label:32}{ours:>12.3f}{theirs:>12.3f}{ratio}")


if __name__ == "__main__":
    sys.exit(main())
