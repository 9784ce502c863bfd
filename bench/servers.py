"""Server processes for the HTTP benchmarks and checks: start, wait until ready, stop.

A ``ServerProcess`` is one child process listening on a loopback port. Its stderr (and
stdout) go to a log file, so a chatty server never blocks on a full pipe and the log can be
searched afterwards. ``stop`` sends SIGTERM and waits; a process still alive after the wait is
killed, so a benchmark never leaves a server behind. ``open_servers`` is the context manager
that guarantees it: every server it started is stopped on the way out, error or not; on Linux a
server also gets SIGTERM from the kernel if the benchmark itself dies (even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def openblas_preload() -> str | None:
    """``LD_PRELOAD`` value that gives a plain MLX process the BLAS ``runtime.blas`` picks.

    mlx-lm's server imports MLX with the wheel's reference BLAS (~65x slower matmul on CPU)
    unless the optimized library is mapped first; our server does that itself.
    """
    from runtime.blas import loaded_blas, preload_blas

    blas = loaded_blas() or preload_blas()
    if blas is None:
        return None
    lapack = blas.replace("libblas.so.3", "liblapack.so.3")
    return f"{blas}:{lapack}" if lapack != blas and os.path.exists(lapack) else blas


def dispatch_preload() -> tuple[str, dict[str, str]] | None:
    """``LD_PRELOAD`` and variables that give a plain MLX process our whole BLAS set-up:
    OpenBLAS plus the few-row dispatch to BLIS (``runtime/native/sgemm_dispatch.c``), or
    ``None`` where this machine lacks it."""
    from runtime.blas import SKINNY_ROWS, loaded_blas, preload_blas, shim_path, skinny_blas

    blas = loaded_blas() or preload_blas()
    openblas = openblas_preload()
    blis = skinny_blas()
    if blas is None or openblas is None or blis is None:
        return None
    variables = {
        "MLXRUNNER_SGEMM_OPENBLAS": blas,
        "MLXRUNNER_SGEMM_BLIS": blis,
        "MLXRUNNER_SGEMM_ROWS": os.environ.get("MLXRUNNER_SKINNY_ROWS", str(SKINNY_ROWS)),
    }
    return f"{shim_path()}:{openblas}", variables


def _serve_command(
    module: list[str], model: str | Path, port: int, extra: tuple[str, ...]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        *module,
        "--model",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        *extra,
    ]


def mlxrunner_command(model: str | Path, port: int, *extra: str) -> list[str]:
    """``mlxrunner serve`` of this checkout (``sys.executable -m cli.main``, no venv assumed)."""
    return _serve_command(["cli.main", "serve"], model, port, extra)


def mlx_lm_command(model: str | Path, port: int, *extra: str) -> list[str]:
    return _serve_command(["mlx_lm.server"], model, port, extra)


def child_env(
    *, preload: str | None = None, variables: dict[str, str] | None = None
) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``."""
    env = dict(os.environ) | (variables or {})
    paths = [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when the parent dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


@attrs.define(eq=False)
class ServerProcess:
    """A server child process on ``port``; ``log`` holds its stdout and stderr."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float

    @classmethod
    def start(
        cls, name: str, command: list[str], port: int, log: Path, env: dict[str, str]
    ) -> ServerProcess:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return cls(name=name, port=port, process=process, log=log, started_at=time.monotonic())

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def health(self) -> int | None:
        """The status of ``GET /health``, or ``None`` while nothing answers."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            conn.close()

    def wait_ready(self, timeout: float) -> float:
        """Poll ``/health`` until it answers 200; return the seconds since the start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                    + self.output()[-3000:]
                )
            if self.health() == 200:
                return time.monotonic() - self.started_at
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or ``None`` if the process is still running after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            print(f"{self.name} ignored SIGTERM for {timeout:.0f} s: killing it", file=sys.stderr)
            self.process.kill()
            code = self.process.wait()
        return code


@contextlib.contextmanager
def open_servers() -> Iterator[list[ServerProcess]]:
    """A list to append started servers to; all of them are stopped when the block ends."""
    servers: list[ServerProcess] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks (and server stops) still run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def post_json(port: int, path: str, body: dict[str, object], timeout: float = 600) -> object:
    """One non-streaming POST; the decoded JSON reply (raises on a non-200 status)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: {response.status} {data[:500]!r}")
        return json.loads(data)
    finally:
        conn.close()
