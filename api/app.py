"""The quart-trio application and the hypercorn server that runs it in the actor tree.

``create_app`` wires the three route families (native, Ollama, OpenAI) and the embedding
routes (``api/embeddings.py``), ``/metrics``,
``/openapi.json`` (built from the routes' declarations, ``api/openapi.py``), the request guard
and the error mapping around one ``RunnerClient``. The app starts no tasks of
its own: a generation's work runs in the tree, and a route only reads its handle.

The guard runs before every route, in this order (the decisions are ``api/guard.py``'s): the
request gets its id; a non-local ``Host`` (while listening on loopback) and a browser
``Origin`` that is not allowed get 403; an allowed origin's CORS preflight is answered here,
without the key; then the API key (401) and, for a POST, a JSON content type (415).

``serve_http`` runs it with hypercorn in the caller's nursery until ``shutdown_trigger``
returns (for ``mlxrunner serve``: once the tree has drained, see ``actors/tree.py``). Then the
app refuses new generations (503; ``/health`` says ``shutting_down``), hypercorn stops
accepting connections and gives open responses ``graceful_timeout`` seconds to finish before
it cancels them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio

from actors.messages import RunnerClient
from api import embeddings, errors, model_admin, native, ollama, openai, pull
from api.connection import HTTPConnection
from api.context import ApiConfig, ApiContext
from api.guard import bearer_token_matches, body_refusal, method_label
from api.metrics import CONTENT_TYPE, Metrics
from api.openapi import TEXT, document, endpoint

__all__ = ["ApiConfig", "create_app", "serve_http"]

_PUBLIC_PATHS = frozenset({"/health"})  # probes work without the key


def create_app(client: RunnerClient, config: ApiConfig) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)  # no static files: no /static route
    app.asgi_http_class = HTTPConnection
    # Quart's 60 s default would cut long generations mid-stream (without the final chunk).
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.json.sort_keys = False  # type: ignore[attr-defined]
    ctx = ApiContext(client=client, config=config, metrics=Metrics(client.statistics))
    app.extensions["mlxrunner"] = ctx

    errors.register(app)
    app.register_blueprint(native.blueprint(ctx))
    app.register_blueprint(ollama.blueprint(ctx))
    app.register_blueprint(openai.blueprint(ctx))
    app.register_blueprint(embeddings.blueprint(ctx))
    app.register_blueprint(pull.blueprint(ctx))
    app.register_blueprint(model_admin.blueprint(ctx))

    @app.get("/metrics")
    @endpoint("Prometheus metrics", media=(TEXT,))
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    @endpoint("This document: every route and its request schema")
    async def openapi_document() -> Response:
        return jsonify(openapi_of(app))

    guard = config.guard

    @app.before_request
    async def check_request() -> Response | None:
        g.request_id = errors.new_request_id()
        headers = request.headers
        origin = headers.get("Origin")
        refusal = guard.host_refusal(headers.get("Host")) or guard.origin_refusal(origin)
        if refusal is not None:
            raise errors.ApiError(403, refusal)
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in headers
        if origin is not None and preflight:  # answered here: browsers send it without the key
            asked = headers.get("Access-Control-Request-Headers")
            return Response(b"", status=204, headers=guard.preflight_headers(asked))
        key = config.api_key
        public = request.path in _PUBLIC_PATHS
        if key and not public and not bearer_token_matches(headers.get("Authorization"), key):
            raise errors.ApiError(
                401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        # A matched route's body (unmatched ones answer 404 or 405 instead).
        if (
            request.url_rule is not None
            and (problem := body_refusal(request.method, request.mimetype)) is not None
        ):
            raise errors.ApiError(415, problem)
        return None

    @app.after_request
    async def finish(response: Response) -> Response:
        response.headers[errors.REQUEST_ID_HEADER] = errors.request_id()
        origin = request.headers.get("Origin")
        if origin is not None and guard.origin_allowed(origin):
            response.headers.update(guard.response_headers(origin))
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = method_label(request.method)
        ctx.metrics.requests.labels(rule, method, str(response.status_code)).inc()
        return response

    return app


def openapi_of(app: QuartTrio) -> dict[str, Any]:
    """The app's OpenAPI document (built once: the routes are fixed once the app serves)."""
    doc: dict[str, Any] | None = app.extensions.get("mlxrunner.openapi")
    if doc is None:
        config = context_of(app).config
        doc = document(
            app, version=config.version, api_key=bool(config.api_key), public_paths=_PUBLIC_PATHS
        )
        app.extensions["mlxrunner.openapi"] = doc
    return doc


def context_of(app: QuartTrio) -> ApiContext:
    ctx: ApiContext = app.extensions["mlxrunner"]
    return ctx


def hypercorn_config(host: str, port: int, graceful_timeout: float) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    # A logger, not "-": hypercorn then adds no handler of its own (no doubled lines).
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_http(
    app: QuartTrio,
    config: HypercornConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns, then stop as described above; reports the
    bound URLs through ``task_status``."""
    ctx = context_of(app)

    async def drain_then_stop() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        ctx.draining = True

    await serve(app, config, shutdown_trigger=drain_then_stop, task_status=task_status)
