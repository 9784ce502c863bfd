"""``serve`` as a process: SIGTERM drains open streams within the grace period, exit code 0.

The server process runs ``cli.serve.serve`` (the actor tree, its signal handling and
hypercorn) over the harness's scripted engine (``python -m tests.api_fakes``): the real
drain and exit path without loading a model.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.api_fakes import raw_request
from tests.waits import read_until

ROOT = Path(__file__).resolve().parent.parent


def fake_server(*args: str) -> Any:
    return server_process(sys.executable, "-m", "tests.api_fakes", *args)


@asynccontextmanager
async def server_process(*command: str) -> AsyncIterator[tuple[trio.Process, int, list[bytes]]]:
    process = await trio.lowlevel.open_process(
        list(command),
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:
            port_found = trio.Event()
            port: list[int] = []

            async def drain_stderr() -> None:
                assert process.stderr is not None
                async for data in process.stderr:
                    stderr.append(bytes(data))
                    match = re.search(rb"serving on http://127\.0\.0\.1:(\d+)", b"".join(stderr))
                    if match and not port_found.is_set():
                        port.append(int(match.group(1)))
                        port_found.set()

            nursery.start_soon(drain_stderr)
            with trio.fail_after(60):  # start-up guard only
                await port_found.wait()
            yield process, port[0], stderr
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def get(path: str, port: int) -> bytes:
    stream = await raw_request("127.0.0.1", port, "GET", path)
    data = await read_until(stream, b"}", eof_ok=True)
    await stream.aclose()
    return data


async def test_sigterm_lets_open_streams_finish_then_exits_0() -> None:
    async with fake_server("--delay", "0.01", "--grace", "30") as (
        process,
        port,
        stderr,
    ):
        body = {"prompt": "x", "max_tokens": 200}
        stream = await raw_request("127.0.0.1", port, "POST", "/completion", body)
        first = await read_until(stream, b'"done":false', eof_ok=True)
        assert first.startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGTERM)
        # While it drains, the server still answers: not ready, and no new work.
        while b"shutting_down" not in await get("/health", port):
            await trio.sleep(0.01)
        refused = await raw_request("127.0.0.1", port, "POST", "/completion", {"prompt": "y"})
        answer = await read_until(refused, b"}", eof_ok=True)
        await refused.aclose()
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"retry-after" in answer.lower()
        rest = await read_until(stream, b"0\r\n\r\n", eof_ok=True)
        await stream.aclose()
        received = first + rest
        # All 200 tokens were generated and sent (a reader that lags gets them coalesced into
        # fewer records, so the record count depends on timing; the final count does not).
        assert b'"eval_count":200' in received
        assert b'"done":true' in received
        assert b'"done_reason":1' in received  # num_predict reached
        with trio.fail_after(30):  # hang guard
            code = await process.wait()
        assert code == 0, b"".join(stderr).decode()


async def test_streams_past_the_grace_period_are_cut_and_exit_is_still_0() -> None:
    async with fake_server("--delay", "0.01", "--grace", "0.3") as (
        process,
        port,
        stderr,
    ):
        stream = await raw_request("127.0.0.1", port, "POST", "/completion", {"prompt": "x"})
        await read_until(stream, b'"done":false', eof_ok=True)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):  # hang guard
            code = await process.wait()
        assert code == 0, b"".join(stderr).decode()
        tail = await read_until(stream, b"0\r\n\r\n", eof_ok=True)
        await stream.aclose()
        # 100k tokens at 10 ms each: it ended because the drain cut it, and says so.
        assert b'"done_reason":2' in tail
        assert b'"error":"the server is shutting down: the generation was cut short' in tail


async def test_a_second_signal_ends_open_streams_with_an_error_record_and_exits_0() -> None:
    async with fake_server("--delay", "0.01", "--grace", "600") as (process, port, stderr):
        native = await raw_request("127.0.0.1", port, "POST", "/completion", {"prompt": "x"})
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}
        sse = await raw_request("127.0.0.1", port, "POST", "/v1/chat/completions", body)
        await read_until(native, b'"done":false', eof_ok=True)
        # A content delta, not the role delta that may come first: the stream is running.
        await read_until(sse, b'"delta":{"content":"', eof_ok=True)
        process.send_signal(signal.SIGTERM)
        while b"shutting_down" not in await get("/health", port):
            await trio.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # the grace period is long: stop now
        native_tail = await read_until(native, b"0\r\n\r\n", eof_ok=True)
        sse_tail = await read_until(sse, b"0\r\n\r\n", eof_ok=True)
        for stream in (native, sse):
            await stream.aclose()
        with trio.fail_after(30):  # hang guard
            code = await process.wait()
        assert code == 0, b"".join(stderr).decode()
    records = [line for line in native_tail.split(b"\n") if line.startswith(b"{")]
    assert b'"done_reason":2' in records[-1]
    assert b'"error":"the server is stopping now' in records[-1]
    assert sum(b'"done":true' in record for record in records) == 1
    assert b'data: {"error":{"message":"the server is stopping now' in sse_tail
    assert b"[DONE]" not in sse_tail


def test_serve_command_line_errors_exit_nonzero_with_one_line(tmp_path, capsys) -> None:
    from cli.main import build_parser
    from cli.serve import main

    def serve(*flags: str) -> int:
        args = build_parser().parse_args(["serve", "--port", "0", *flags])
        return main(args)

    with pytest.raises(SystemExit) as exit_info:
        serve("--parallel", "0")
    assert exit_info.value.code == 1
    assert "--parallel" in capsys.readouterr().err
    assert serve("--api-key-file", str(tmp_path / "missing")) == 1
    assert "--api-key-file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        serve("--max-open", "0")
    assert exit_info.value.code == 1
    assert "--max-open" in capsys.readouterr().err
    assert serve("--models-dir", str(tmp_path), "--model", "nosuch:model") == 1
    err = capsys.readouterr().err
    assert "nosuch" in err
    assert "Traceback" not in err


def test_served_names() -> None:
    from cli.serve import served_name

    assert served_name("smollm2:135m") == "smollm2:135m"
    assert served_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name("/models/qwen3-folder") == "qwen3-folder"


async def test_mlxrunner_serve_runs_a_tiny_real_model_end_to_end(tmp_path) -> None:
    from runtime.testing.models import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny-llama")
    command = [sys.executable, "-m", "cli.main", "serve", "--model", str(folder), "--port", "0"]
    async with server_process(*command, "--grace", "5") as (process, port, stderr):
        with trio.fail_after(120):  # load guard
            while b'"ok"' not in await get("/health", port):
                await trio.sleep(0.05)
        body = {"prompt": "hello", "options": {"temperature": 0, "num_predict": 4}, "stream": False}
        stream = await raw_request("127.0.0.1", port, "POST", "/completion", body)
        answer = await read_until(stream, b"}\n", eof_ok=True)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"eval_count":4' in answer
        assert b'"done_reason":1' in answer
        tags = await get("/api/tags", port)
        assert b'"name":"tiny-llama"' in tags
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):  # hang guard
            code = await process.wait()
        assert code == 0, b"".join(stderr).decode()
