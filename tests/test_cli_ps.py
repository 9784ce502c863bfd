"""``mlxrunner ps`` against a server in this process (a fake runner behind the real HTTP app):
the table, a loading server, an API key, and a server that is not there."""

from __future__ import annotations

import datetime as dt
import socket
from typing import Any

import pytest
import trio

from api.app import ApiConfig, create_app
from cli import ps
from cli.main import main
from tests.api_fakes import FakeRunner, serve_app

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


async def _ps(port: int, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await trio.to_thread.run_sync(main, ["ps", "--port", str(port)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_ps_prints_the_loaded_model(capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="smollm2:135m"))
    async with serve_app(app) as (_, port):
        code, out, err = await _ps(port, capsys)
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL"]
    assert row.split() == ["smollm2:135m", "ab" * 6, "92.0", "MB", "64", "Forever"]


async def test_ps_while_loading_shows_no_model(capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(FakeRunner(state="loading"), ApiConfig())
    async with serve_app(app) as (_, port):
        code, out, _ = await _ps(port, capsys)
    assert code == 0
    assert out.split() == ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL"]


async def test_ps_sends_the_api_key_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ps.ENV_API_KEY, raising=False)
    app = create_app(FakeRunner(), ApiConfig(api_key="sesame"))
    async with serve_app(app) as (_, port):
        code, out, err = await _ps(port, capsys)
        assert (code, out) == (1, "")
        assert err == f"Error: http://127.0.0.1:{port} wants an API key: set $MLXRUNNER_API_KEY\n"
        monkeypatch.setenv(ps.ENV_API_KEY, "sesame")
        code, out, _ = await _ps(port, capsys)
    assert code == 0
    assert "fake:latest" in out


def test_ps_without_a_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:  # bound, never listening: connections are refused
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["ps", "--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"Error: could not reach a server at http://127.0.0.1:{port} (")
    assert "mlxrunner serve" in line


def test_rows_read_ollama_fields_and_tolerate_missing_ones() -> None:
    models: list[dict[str, Any]] = [
        {
            "name": "a:1",
            "digest": "sha256:" + "0123456789abcdef" * 4,
            "size": 2_000_000_000,
            "context_length": 8192,
            "expires_at": "2026-01-01T00:05:30Z",
        },
        {"model": "b:2"},
    ]
    assert ps.rows(models, NOW)[1:] == [
        ("a:1", "0123456789ab", "2.0 GB", "8192", "5 minutes from now"),
        ("b:2", "", "", "", ""),
    ]


def test_base_url_brackets_ipv6_hosts() -> None:
    assert ps.base_url("::1", 11435) == "http://[::1]:11435"
    assert ps.base_url("localhost", 1) == "http://localhost:1"
