"""The one place that maps request errors to HTTP statuses and JSON bodies.

Every error a client can cause ends as ``{"error": "<message>"}`` with a 4xx or 503 status;
429 and 503 carry ``Retry-After``. A ``GenerationError`` (the runner failed a generation it
had admitted; the runner logged why) is answered 500 with its message. Anything else escaping
a handler is a bug: it is logged with its traceback and answered 500 (the connection stays
usable, the server keeps running).
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Response, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from actors.messages import GenerationError, QueueFullError, UnavailableError
from runtime.errors import (
    ModelLoadError,
    ModelNotFoundError,
    OptionsError,
    PromptError,
    PromptTooLongError,
    RuntimeInputError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_QUEUE_FULL = 1  # seconds: a slot frees as soon as one generation ends
RETRY_AFTER_LOADING = 5
RETRY_AFTER_SHUTTING_DOWN = 30  # another instance should have taken over by then


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
        case RuntimeInputError():
            return 400, str(exc), {}
        case NotFound():
            return 404, "no such route", {}
        case MethodNotAllowed():
            allowed = ", ".join(exc.valid_methods or ())
            return 405, "method not allowed", {"Allow": allowed} if allowed else {}
        case GenerationError():
            return 500, str(exc), {}
        case HTTPException():
            code = exc.code or 400
            return code, exc.description or exc.name, {}
        case _:
            return 500, "internal error", {}


def error_response(exc: BaseException) -> Response:
    status, message, headers = status_of(exc)
    if status >= 500 and not isinstance(exc, RuntimeInputError | ApiError | GenerationError):
        log.error("unhandled error in a request handler", exc_info=exc)
    return json_error(status, message, headers)


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def stream_error_payload(exc: BaseException) -> dict[str, Any]:
    """The body of an error that happens after a stream's 200 header was sent."""
    return {"error": status_of(exc)[1]}


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
