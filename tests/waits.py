"""Bounded waits the tests share: polling state another thread changes, reading a socket.

Both are hang guards, not timings: they fail after a generous limit instead of hanging.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


async def wait_until(predicate: Callable[[], bool], what: str = "", limit: float = 20) -> None:
    """Poll ``predicate`` (state an engine or worker thread changes) until it holds."""
    with trio.move_on_after(limit) as scope:
        while not predicate():
            await trio.sleep(0.001)
    if scope.cancelled_caught:
        raise AssertionError(f"still waiting after {limit} s{': ' + what if what else ''}")


async def read_until(
    stream: trio.SocketStream,
    done: Callable[[bytes], bool] | bytes,
    *,
    eof_ok: bool = False,
    limit: float = 20,
) -> bytes:
    """Read until ``done(received)`` (or, for bytes, until they appear).

    The server closing the connection first fails the test, unless ``eof_ok``: then what
    came is returned.
    """
    test = done if callable(done) else (lambda received, marker=done: marker in received)
    received = b""
    with trio.fail_after(limit):
        while not test(received):
            data = await stream.receive_some(65536)
            if not data:
                assert eof_ok, "the server closed the connection early"
                break
            received += data
    return received
