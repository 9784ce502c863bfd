"""quart-trio's HTTP connection, less a race that left ``Connection: close`` sockets open.

quart-trio runs a request as two tasks in one nursery: one reads the ASGI messages, one sends
the response, and whichever ends first cancels the other. Hypercorn handles the last body
message of a response by posting ``http.disconnect`` (which ends the reading task) and then,
still inside that send call, closing the socket when the connection cannot be reused (the
client sent ``Connection: close`` or spoke HTTP/1.0). The reading task's cancellation landed
on that close, so the socket stayed open: the client waited for EOF that never came, and the
server held the descriptor until the client gave up (found by the disconnect storm).

Here the reading task does not cancel a response whose last message is being sent; the
sending task ends the nursery itself right after. A client that leaves earlier still cancels
the response at once.
"""

from __future__ import annotations

from typing import Any

import trio
from quart.asgi import ASGIHTTPConnection
from quart_trio.asgi import TrioASGIHTTPConnection


class HTTPConnection(TrioASGIHTTPConnection):
    _finishing = False  # the response's last message is being sent

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, receive: Any
    ) -> None:
        await ASGIHTTPConnection.handle_messages(self, request, receive)
        if not self._finishing:
            nursery.cancel_scope.cancel()

    async def _send_response(self, send: Any, response: Any) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finishing = True
            await send(message)

        await super()._send_response(sending, response)
