"""Disconnect cancellation over a real socket: hypercorn on 127.0.0.1:0, a raw client that
reads a little and hangs up, and the runner's own counters as the witness.

The fake makes a chunk only when the route reads one, so a closed generation produces
nothing more: its counters (``active``, ``cancelled``, ``finished``) are the whole witness.
"""

from __future__ import annotations

import trio
import trio.testing

from api.app import ApiConfig, context_of, create_app
from tests.api_fakes import FakeRunner, raw_request, serve_app
from tests.live_server import open_descriptors
from tests.waits import read_until, wait_until


def paced(seconds: float):
    async def step() -> None:
        await trio.sleep(seconds)

    return step


def paced_runner() -> FakeRunner:
    # An endless generation, one token per read after a short sleep: it stops when closed.
    return FakeRunner(endless=True, step=paced(0.002))


async def assert_generation_stopped(fake: FakeRunner) -> None:
    await wait_until(lambda: fake.active == 0, "sequence freed")
    assert fake.statistics().active_sequences == 0
    assert fake.cancelled == 1  # closed before its end: nothing more is made
    assert fake.finished == 0


async def test_stream_disconnect_frees_the_sequence() -> None:
    fake = paced_runner()
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        stream = await raw_request(host, port, "POST", "/completion", {"prompt": "hi"})
        received = await read_until(stream, lambda r: r.count(b'"done":false') >= 2)
        assert received.startswith(b"HTTP/1.1 200")
        assert fake.active == 1
        await stream.aclose()
        await assert_generation_stopped(fake)
        assert context_of(app).metrics.value("mlxrunner_cancellations_total") == 1


async def test_sse_disconnect_frees_the_sequence() -> None:
    fake = paced_runner()
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}
        stream = await raw_request(host, port, "POST", "/v1/chat/completions", body)
        await read_until(stream, lambda r: r.count(b"data: ") >= 3)
        await stream.aclose()
        await assert_generation_stopped(fake)


async def test_non_streaming_disconnect_frees_the_sequence() -> None:
    fake = paced_runner()
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        body = {"prompt": "hi", "stream": False}
        stream = await raw_request(host, port, "POST", "/completion", body)
        await wait_until(lambda: fake.generated >= 2, "two tokens generated")
        await stream.aclose()
        await assert_generation_stopped(fake)


async def test_other_streams_continue_when_one_client_leaves() -> None:
    fake = FakeRunner(script=("a",) * 40, step=paced(0.002))
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        leaving = await raw_request(host, port, "POST", "/completion", {"prompt": "x"})
        staying = await raw_request(host, port, "POST", "/completion", {"prompt": "y"})
        first = await read_until(leaving, lambda r: b"\r\n\r\n" in r)
        assert first.startswith(b"HTTP/1.1 200")
        await leaving.aclose()
        received = await read_until(staying, lambda r: b'"done":true' in r)
        await staying.aclose()
        assert b'"done_reason":0' in received
        assert received.count(b'"done":false') == 40
        await wait_until(lambda: fake.active == 0, "both sequences gone")
        assert fake.finished == 1
        assert fake.cancelled == 1


async def test_disconnect_while_queued_never_starts_the_generation() -> None:
    fake = paced_runner()
    fake.admission = trio.Event()
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        for path, body in (
            ("/completion", {"prompt": "x"}),
            ("/api/generate", {"model": "fake", "prompt": "x", "stream": False}),
        ):
            stream = await raw_request(host, port, "POST", path, body)
            await wait_until(lambda: fake.waiting == 1, "request queued")
            await stream.aclose()
            await wait_until(lambda: fake.waiting == 0, "queued request left")
        fake.admission.set()
        # A request still waiting for admission would be admitted now; let it try.
        await trio.testing.wait_all_tasks_blocked()
        assert fake.requests == []
        assert fake.generated == 0


async def test_a_connection_close_client_gets_eof_and_its_socket_is_freed() -> None:
    # The server used to send the whole answer and then keep the socket open: the client
    # waited for an EOF that never came (HTTP/1.0, or "Connection: close").
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with serve_app(app) as (host, port):
        before = open_descriptors()
        for request in (
            b"GET /api/version HTTP/1.0\r\n\r\n",
            b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b'Content-Length: 15\r\n\r\n{"prompt":"hi"}',
        ):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(request)
            received = await read_until(stream, lambda _: False, eof_ok=True)  # until EOF
            await stream.aclose()
            assert received.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), received
        await wait_until(lambda: open_descriptors() == before, "server sockets closed")
