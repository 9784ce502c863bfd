"""How many tokens per second the actors and HTTP can stream, with no model in the way.

Serves ``mlxrunner serve`` machinery (the real tree, scheduler, pipelines and HTTP) around a
scripted engine that imitates the GPU engine's timing: each step holds the GIL for
``--busy`` ms (the engine thread building the step's graph in Python), then waits ``--wait``
ms without it (MLX evaluating), then gives every running sequence one token. Streams
``--streams`` native ``/completion`` requests at once from a separate process and prints the
aggregate rate next to the engine's own (streams / step time): their ratio is what the HTTP
side can carry. Run the server under ``py-spy record --threads -p PID`` to see where the
event loop's time goes.

Run: ``python bench/http_loop.py [--streams 64] [--busy 2.5] [--wait 4.5] [--stream-interval N|auto]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.http_client import run_concurrently, stream_native, window_rate
from bench.servers import ROOT, ServerProcess, child_env, free_port, open_servers


def serve(busy_ms: float, wait_ms: float, port: int, streams: int, interval: str) -> None:
    """The server process: the tree around the timed scripted engine."""
    import trio

    from actors.testing import ScriptedEngine, scripted_load, tiny_tokenizer
    from cli.main import build_parser
    from cli.serve import serve as serve_tree

    def script(request: Any) -> list[int]:  # tokens the tiny tokenizer decodes to text
        start = request.prompt[-1]
        return [50 + (start + 1 + i) % 200 for i in range(request.max_tokens)]

    class TimedEngine(ScriptedEngine):
        def step(self) -> Any:
            end = time.perf_counter() + busy_ms / 1000
            while time.perf_counter() < end:  # Python work: holds the GIL
                pass
            time.sleep(wait_ms / 1000)  # releases it, as MLX's evaluation does
            return super().step()

    engine = TimedEngine(script, context_length=8192, prefill_chunk=8192)
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "timed",
            "--port",
            str(port),
            "--parallel",
            str(streams),
            "--stream-interval",
            str(interval),
        ]
    )
    trio.run(functools.partial(serve_tree, args, load=scripted_load(engine, tiny_tokenizer())))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--busy", type=float, default=2.5, help="ms of GIL-held work per step")
    parser.add_argument("--wait", type=float, default=4.5, help="ms of GIL-free wait per step")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-interval", default="auto", help="the server's flag")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_port is not None:
        serve(args.busy, args.wait, args.serve_port, args.streams, args.stream_interval)
        return 0
    port = free_port()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-port",
        str(port),
        "--busy",
        str(args.busy),
        "--wait",
        str(args.wait),
        "--streams",
        str(args.streams),
        "--stream-interval",
        str(args.stream_interval),
    ]
    bodies = [
        {
            "prompt": [60 + i % 100, 61, 62],
            "options": {"temperature": 0.0, "repeat_penalty": 1.0, "num_predict": args.tokens},
        }
        for i in range(args.streams)
    ]
    engine_rate = args.streams / ((args.busy + args.wait) / 1000)
    with open_servers() as servers:
        server = ServerProcess.start(
            "timed", command, port, ROOT / ".bench" / "logs" / "http_loop.log", child_env()
        )
        servers.append(server)
        server.wait_ready(60)
        run_concurrently(stream_native, port, bodies)  # warm-up
        print(f"server pid {server.process.pid}; engine at most {engine_rate:.0f} tok/s")
        for _ in range(args.repeats):
            rate = window_rate(run_concurrently(stream_native, port, bodies))
            print(
                f"{args.streams} streams: {rate:.0f} tok/s, {rate / engine_rate:.2f} of the engine"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
