"""Ollama's ``/api/pull``: download a model into the server's store, progress streamed.

The body is Ollama's: ``model`` (or the older ``name``), ``stream`` (default true) and
``insecure`` (a registry on another host than the default one is reached over HTTP). Streamed, each line
is one ``PullProgress`` (``status``, and ``digest``/``total``/``completed`` while a blob
downloads), ending with ``{"status": "success"}``, or with ``{"error": "..."}`` when the pull
fails after the header, as Ollama's client expects. Without streaming the reply is
``{"status": "success"}`` once it is done. The name and the manifest are checked before the
header: an unknown model is a 404, a manifest this store cannot hold or an unreachable
registry a 502 (``api/errors.py``). A server allows pulls only when its ``ApiConfig`` says so
(``mlxrunner serve`` does; 403 otherwise), into the store it serves from.

The pull is ``runtime.store.pull.pull_model``, a synchronous generator; each of its steps (one
chunk of a blob, at most a socket timeout) runs in a worker thread, never on the event loop.
When the client goes away the response is cancelled after the step in progress, and the
generator is closed: the download stops and keeps its part for the next pull. The pulled
model is in the store; the model this server serves does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator

import trio
from quart import Blueprint, Response, jsonify

from api import fields
from api.context import ApiContext
from api.errors import ApiError, bad_request, request_id, stream_error_payload
from api.fields import MODEL, DeclaredBody
from api.generation import StreamBody
from api.native import STREAM, ndjson_line
from api.openapi import JSON, NDJSON, endpoint
from runtime.store.layout import Store
from runtime.store.pull import PullProgress, pull_model

NAME = fields.string("name", description="an older name of 'model'")
INSECURE = fields.boolean(
    "insecure", False, description="reach a registry other than the default one over HTTP"
)
PULL = fields.body(MODEL, NAME, INSECURE, STREAM)
_ERRORS = (403, 404, 502, 503)  # 403: pulling is not allowed on this server


class PullSteps:
    """A pull's generator, stepped in worker threads; ``close`` stops it between steps."""

    def __init__(self, steps: Generator[PullProgress, None, None]) -> None:
        self._steps = steps

    async def next(self) -> PullProgress | None:
        # Not abandoned on cancellation: a step ends within a socket timeout, and the
        # generator must not be closed while a thread still runs it.
        return await trio.to_thread.run_sync(next, self._steps, None)

    def close(self) -> None:
        self._steps.close()


async def _lines(steps: PullSteps, first: list[PullProgress], rid: str) -> AsyncIterator[bytes]:
    try:
        for before in first:
            yield ndjson_line(before.to_json())
        while (line := await steps.next()) is not None:
            yield ndjson_line(line.to_json())
    except Exception as exc:
        yield ndjson_line(stream_error_payload(exc, rid))
    finally:
        steps.close()


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("pull", __name__)

    @bp.post("/api/pull")
    @endpoint(
        "Ollama: download a model into the store; NDJSON progress, or one JSON object when "
        "not streaming",
        body=PULL,
        media=(NDJSON, JSON),
        errors=_ERRORS,
    )
    async def pull(body: DeclaredBody) -> Response:
        name = MODEL.read(body) or NAME.read(body)
        if not name:
            raise bad_request("'model' is required")
        if not ctx.config.allow_pull:
            raise ApiError(403, "pulling models is not allowed on this server")
        ctx.check_admitting()
        store = Store.at(ctx.config.models_dir)
        steps = PullSteps(pull_model(name, store=store, insecure=INSECURE.read(body)))
        try:
            # Before the header: the name, and for a registry model its manifest (the step
            # after "pulling manifest"), so that those errors get their HTTP status.
            first: list[PullProgress] = []
            while (line := await steps.next()) is not None:
                first.append(line)
                if line.status != "pulling manifest":
                    break
            if not STREAM.read(body):
                while await steps.next() is not None:
                    pass
        except BaseException:
            steps.close()
            raise
        if not STREAM.read(body):
            steps.close()
            return jsonify({"status": "success"})
        response = Response(StreamBody(steps, _lines(steps, first, request_id())))
        response.mimetype = NDJSON
        response.timeout = None  # a long download must not be cut by Quart's response timeout
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    return bp
