"""Shutdown regression check for ``mlxrunner serve`` on a real device (issue 10).

Writes a random 1B-class llama folder in bf16 under ``.bench/`` (Llama-3.2-1B shapes,
``--tiny``: a small one for a CPU run) with the in-process test tokenizer, then runs the server
twice with ``--parallel 16``:

1. drain: 16 concurrent non-streaming ``/completion`` requests (``num_predict`` 32), all
   answered, then SIGTERM;
2. second signal: 16 streaming requests running, SIGTERM, then a second SIGTERM while they
   still run (the stop-at-once path).

Each run passes when the server exits with status 0 within the time limit and its output has
neither "terminate called" (a C++ runtime abort: a thread still in MLX at exit) nor a Python
traceback. The script exits 0 only if both runs pass.
Run: ``python scripts/gpu_shutdown_check.py [--tiny]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import random_llama
from bench.servers import (
    HOST,
    ROOT,
    ServerProcess,
    child_env,
    exit_on_sigterm,
    free_port,
    mlxrunner_command,
    open_servers,
    post_json,
)

BENCH_DIR = ROOT / ".bench"
PROMPT = "Once upon a time there was a little girl who loved to play in the sun with her friends."
GRACE_S = 10.0  # the server's --grace (its default)
EXIT_LIMIT_S = 60.0  # beyond the grace: a server that has not exited by then hangs
BAD_OUTPUT = ("terminate called", "Traceback (most recent call last)")


class _Stream(threading.Thread):
    """One streaming ``/completion`` that reads until the server ends it, however it ends."""

    def __init__(self, port: int, num_predict: int, started: threading.Semaphore) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.num_predict = num_predict
        self.started = started
        self.chunks = 0
        self.outcome = "pending"

    def run(self) -> None:
        body = {"prompt": PROMPT, "options": {"num_predict": self.num_predict}}
        conn = http.client.HTTPConnection(HOST, self.port, timeout=EXIT_LIMIT_S)
        try:
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/completion", json.dumps(body), headers)
            response = conn.getresponse()
            if response.status != 200:
                self.outcome = f"refused ({response.status})"
                return
            for line in response:
                if not line.strip():
                    continue
                self.chunks += 1
                if self.chunks == 1:
                    self.started.release()
                event = json.loads(line)
                if event.get("done"):
                    self.outcome = f"done_reason {event.get('done_reason')}"
            if self.outcome == "pending":
                self.outcome = "ended without a last chunk"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.outcome = f"cut ({type(exc).__name__})"
        finally:
            conn.close()
            if self.chunks == 0:
                self.started.release()  # never started: do not keep the caller waiting


def start_server(folder: Path, args: argparse.Namespace, name: str) -> ServerProcess:
    port = free_port()
    command = mlxrunner_command(
        folder, port, "--parallel", str(args.parallel), "--grace", str(GRACE_S)
    )
    log = BENCH_DIR / "logs" / f"shutdown-{name}.log"
    return ServerProcess.start(name, command, port, log, child_env())


def finish(server: ServerProcess, signalled_at: float, notes: str) -> dict[str, Any]:
    code = server.wait(EXIT_LIMIT_S + GRACE_S)
    exit_s = time.monotonic() - signalled_at
    if code is None:
        server.process.kill()
        server.process.wait()
    output = server.output()
    found = [bad for bad in BAD_OUTPUT if bad in output]
    return {
        "run": server.name,
        "exit_status": code,
        "exit_s": exit_s,
        "bad_output": found,
        "notes": notes,
        "passed": code == 0 and not found,
        "log": str(server.log),
    }


def drain_run(
    folder: Path, args: argparse.Namespace, servers: list[ServerProcess]
) -> dict[str, Any]:
    server = start_server(folder, args, "drain")
    servers.append(server)
    server.wait_ready(600)
    body = {"prompt": PROMPT, "stream": False, "options": {"num_predict": args.num_predict}}
    replies: list[object] = []

    def one() -> None:
        try:
            replies.append(post_json(server.port, "/completion", body))
        except (OSError, RuntimeError, ValueError) as exc:
            replies.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args.requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = sum(1 for r in replies if isinstance(r, dict) and r.get("done"))
    server.signal(signal.SIGTERM)
    result = finish(server, time.monotonic(), f"{answered}/{args.requests} answered before SIGTERM")
    result["passed"] = result["passed"] and answered == args.requests
    return result


def second_signal_run(
    folder: Path, args: argparse.Namespace, servers: list[ServerProcess]
) -> dict[str, Any]:
    server = start_server(folder, args, "second-signal")
    servers.append(server)
    server.wait_ready(600)
    started = threading.Semaphore(0)
    # Long enough to be still running when the second signal comes.
    streams = [_Stream(server.port, 100_000, started) for _ in range(args.requests)]
    for stream in streams:
        stream.start()
    for _ in streams:
        started.acquire(timeout=EXIT_LIMIT_S)
    server.signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    time.sleep(args.second_after)
    running = sum(1 for s in streams if s.outcome == "pending")
    server.signal(signal.SIGTERM)
    result = finish(server, signalled_at, "")
    for stream in streams:
        stream.join(EXIT_LIMIT_S)
    outcomes: dict[str, int] = {}
    for stream in streams:
        outcomes[stream.outcome] = outcomes.get(stream.outcome, 0) + 1
    result["notes"] = f"{running} streaming at the 2nd SIGTERM; " + ", ".join(
        f"{n} {o}" for o, n in sorted(outcomes.items())
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU run)")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--num-predict", type=int, default=32)
    parser.add_argument(
        "--second-after", type=float, default=0.5, help="seconds between the two signals"
    )
    args = parser.parse_args()
    exit_on_sigterm()
    folder = random_llama.bf16_folder("tiny" if args.tiny else "1b", BENCH_DIR)
    with open_servers() as servers:
        results = [drain_run(folder, args, servers), second_signal_run(folder, args, servers)]
    print(f"\n{folder.name}, --parallel {args.parallel}, {args.requests} requests")
    print(f"{'run':<15}{'exit':>6}{'exit s':>8}  {'bad output':<24}{'result':<8}notes")
    for r in results:
        bad = ", ".join(r["bad_output"]) or "none"
        verdict = "ok" if r["passed"] else "FAIL"
        status = "hang" if r["exit_status"] is None else str(r["exit_status"])
        print(f"{r['run']:<15}{status:>6}{r['exit_s']:>8.1f}  {bad:<24}{verdict:<8}{r['notes']}")
    for r in results:
        if not r["passed"]:
            print(f"\n--- {r['run']}: {r['log']} (last lines)\n" + _tail(Path(r["log"])))
    return 0 if all(r["passed"] for r in results) else 1


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
