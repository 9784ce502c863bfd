"""The quart-trio application and the hypercorn server that runs it in the actor tree.

``create_app`` wires the three route families (native, Ollama, OpenAI), ``/metrics``, the
bearer-token check and the error mapping around one ``RunnerClient``. The app starts no tasks
of its own: a generation's work runs in the tree, and a route only reads its handle.

``serve_http`` runs it with hypercorn in the caller's nursery until ``shutdown_trigger``
returns (for ``mlxrunner serve``: once the tree has drained, see ``actors/tree.py``). Then the
app refuses new generations (503; ``/health`` says ``shutting_down``), hypercorn stops
accepting connections and gives open responses ``graceful_timeout`` seconds to finish before
it cancels them.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from actors.messages import RunnerClient
from api import errors, native, ollama, openai
from api.context import ApiConfig, ApiContext
from api.metrics import CONTENT_TYPE, Metrics

__all__ = ["ApiConfig", "create_app", "serve_http"]

_PUBLIC_PATHS = frozenset({"/health"})  # probes work without the key


def create_app(client: RunnerClient, config: ApiConfig) -> QuartTrio:
    app = QuartTrio(__name__)
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

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), content_type=CONTENT_TYPE)

    if config.api_key:
        expected = f"Bearer {config.api_key}".encode()

        @app.before_request
        async def require_key() -> None:
            if request.path in _PUBLIC_PATHS:
                return
            given = request.headers.get("Authorization", "").strip().encode()
            if not hmac.compare_digest(given, expected):
                raise errors.ApiError(
                    401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
                )

    @app.after_request
    async def count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        ctx.metrics.requests.labels(rule, request.method, str(response.status_code)).inc()
        return response

    return app


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
