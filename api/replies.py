"""JSON replies whose size grows with the request: built and encoded off the event loop.

A whole generation with logprobs (thousands of tokens, each with up to 20 alternatives), or
the ids of a long text, is request-sized work: its dictionaries and its JSON took 0.4 s for
4096 tokens with 20 top logprobs. ``json_reply`` builds and encodes such a reply on a worker
thread behind the tree's CPU limiter; a small one is cheaper done here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
from quart import Response, jsonify

from actors.messages import Chunk

INLINE_REPLY_SIZE = 4096  # items (tokens, logprob entries, kilobytes of text) made here


async def json_reply(
    make: Callable[[], dict[str, Any]], size: int, limiter: trio.CapacityLimiter
) -> Response:
    """The JSON response of ``make()``; made on a worker thread when ``size`` (its items, as
    ``whole_reply_size`` counts them) is over ``INLINE_REPLY_SIZE``. ``make`` is plain code
    that touches no shared state."""
    if size <= INLINE_REPLY_SIZE:
        return jsonify(make())
    data = await trio.to_thread.run_sync(_encode, make, limiter=limiter)
    return Response(data, content_type="application/json")


def whole_reply_size(whole: Chunk) -> int:
    """The items of a whole generation's reply: its logprob entries, and its text by the
    kilobyte (text encodes at C speed, the logprobs' dictionaries do not)."""
    logprobs = whole.logprobs
    per_token = 1 + len(logprobs[0].top) if logprobs else 0
    return len(logprobs) * per_token + (len(whole.content) + len(whole.thinking)) // 1024


def _encode(make: Callable[[], dict[str, Any]]) -> bytes:
    return json.dumps(make(), separators=(",", ":")).encode()
