"""The one place that maps request errors to HTTP statuses and JSON bodies.

Every error a client can cause ends as ``{"error": "<message>"}`` with a 4xx or 503 status
and a message that says what to change; 429 and 503 carry ``Retry-After``. A
``GenerationCut`` (cut short by shutdown or a stalled reader, or never admitted) is a 503 with
``Retry-After`` and its message: the work did not finish, and a retry can succeed. After a
stream's header the same errors end the stream with an error record instead (each route
family renders it in its own wire format).

An unexpected server error (any other 5xx: a ``GenerationError``, the runner failing a
generation it had admitted, or a bug escaping a handler) tells the client nothing about its
cause: the body is ``{"error": "internal error (request id <id>)", "request_id": "<id>"}``
(an OpenAI stream's error event carries the same in its error object), and the exception with
its traceback goes to the log under the same id. Every response names its request's id in
``X-Request-Id``. The connection stays usable and the server keeps running.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from quart import Response, g, has_request_context, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from actors.messages import (
    GenerationCut,
    GenerationError,
    OutOfMemoryError,
    OverloadedError,
    QueueFullError,
    UnavailableError,
)
from runtime.errors import (
    ModelLoadError,
    ModelNotFoundError,
    OptionsError,
    PromptError,
    PromptTooLongError,
    PullError,
    RuntimeInputError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_QUEUE_FULL = 1  # seconds: a slot frees as soon as one generation ends
RETRY_AFTER_OVERLOADED = 1  # likewise, once one open generation is read to its end
RETRY_AFTER_LOADING = 5
RETRY_AFTER_SHUTTING_DOWN = 30  # another instance should have taken over by then
RETRY_AFTER_OUT_OF_MEMORY = 5  # running generations end and give their memory back
REQUEST_ID_HEADER = "X-Request-Id"


class ApiError(Exception):
    """A request error raised by the HTTP layer itself (parsing, auth, routing)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def status_of(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(status, message, extra headers) for a request error; raises nothing."""
    match exc:
        case ApiError():
            return exc.status, exc.message, exc.headers
        case QueueFullError():
            return 429, str(exc) or "queue full", {"Retry-After": str(RETRY_AFTER_QUEUE_FULL)}
        case UnavailableError(state="loading"):
            return 503, str(exc) or "loading", {"Retry-After": str(RETRY_AFTER_LOADING)}
        case UnavailableError():
            retry = str(RETRY_AFTER_SHUTTING_DOWN)
            return 503, str(exc) or "shutting down", {"Retry-After": retry}
        case OverloadedError():
            retry = str(RETRY_AFTER_OVERLOADED)
            return 503, str(exc) or "too many open generations", {"Retry-After": retry}
        case ModelNotFoundError():
            return 404, str(exc), {}
        case PromptTooLongError():
            return 413, str(exc), {}
        case PromptError():
            return 400, str(exc), {}
        case OptionsError():
            return 400, str(exc), {}
        case ModelLoadError():
            return 503, str(exc), {"Retry-After": str(RETRY_AFTER_LOADING)}
        case PullError():  # the registry or the hub failed, or sent what cannot be stored
            return 502, str(exc), {}
        case RuntimeInputError():
            return 400, str(exc), {}
        case NotFound():
            return 404, "no such route", {}
        case MethodNotAllowed():
            allowed = ", ".join(exc.valid_methods or ())
            return 405, "method not allowed", {"Allow": allowed} if allowed else {}
        case GenerationCut():
            retry = str(RETRY_AFTER_SHUTTING_DOWN)
            return 503, str(exc) or "the generation was cut short", {"Retry-After": retry}
        case OutOfMemoryError():  # a GenerationError that a retry may get past
            return 503, str(exc), {"Retry-After": str(RETRY_AFTER_OUT_OF_MEMORY)}
        case GenerationError():
            return 500, "internal error", {}
        case HTTPException():
            code = exc.code or 400
            message = "internal error" if is_unexpected(code) else exc.description or exc.name
            return code, message, {}
        case _:
            return 500, "internal error", {}


def is_unexpected(status: int) -> bool:
    """A server error whose cause the client is not told (503 says loading or stopping, 502
    what the registry did)."""
    return status >= 500 and status not in (502, 503)


def new_request_id() -> str:
    return secrets.token_hex(8)


def request_id() -> str:
    """The id of the request being handled (made on first use); a fresh one outside a
    request."""
    if not has_request_context():
        return new_request_id()
    rid: str | None = getattr(g, "request_id", None)
    if rid is None:
        rid = g.request_id = new_request_id()
    return rid


def error_response(exc: BaseException) -> Response:
    status, message, headers = status_of(exc)
    if not is_unexpected(status):
        return json_error(status, message, headers)
    rid = request_id()
    _log_unexpected(exc, rid)
    response = json_error(status, _generic(rid), headers, request_id=rid)
    response.headers[REQUEST_ID_HEADER] = rid
    return response


def json_error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    request_id: str | None = None,
) -> Response:
    body = (
        {"error": message} if request_id is None else {"error": message, "request_id": request_id}
    )
    response = jsonify(body)
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def stream_error_payload(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The error record that ends a stream (native and Ollama routes) when ``exc`` happens
    after the 200 header was sent."""
    status, message, _ = status_of(exc)
    if not is_unexpected(status):
        return {"error": message}
    _log_unexpected(exc, request_id)
    return {"error": _generic(request_id), "request_id": request_id}


def openai_stream_error(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The same for an OpenAI stream: an error object, as OpenAI's own stream errors are."""
    payload = stream_error_payload(exc, request_id)
    status = status_of(exc)[0]
    kind = "server_unavailable" if status == 503 else "server_error"
    error: dict[str, Any] = {"message": payload["error"], "type": kind, "code": status}
    if "request_id" in payload:
        error["request_id"] = payload["request_id"]
    return {"error": error}


def _generic(rid: str) -> str:
    return f"internal error (request id {rid})"


def _log_unexpected(exc: BaseException, rid: str) -> None:
    log.error("request %s failed: %s: %s", rid, type(exc).__name__, exc, exc_info=exc)


def register(app: Any) -> None:
    """Install the handlers on a Quart app: every exception becomes a JSON error."""

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        return error_response(exc)

    @app.errorhandler(RuntimeInputError)
    async def _runtime(exc: RuntimeInputError) -> Response:
        return error_response(exc)

    @app.errorhandler(ApiError)
    async def _api(exc: ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(Exception)
    async def _bug(exc: Exception) -> Response:
        return error_response(exc)
