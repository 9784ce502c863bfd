"""Route declarations and the OpenAPI 3.1 document built from them (``GET /openapi.json``).

Every route is declared with ``@endpoint``: what it does, its request ``Body`` (the fields of
``api/fields.py`` it reads with, so the request schemas cannot drift from the code), the media
types of its success and the error statuses it may answer. For a route with a body the
decorator also decodes the request (a large one on a worker thread, ``api.schemas.parse_json``)
and hands the view a ``DeclaredBody``.

``document`` walks the app's URL map, so every registered route appears; a route that was
never declared makes it fail (a test builds the document for the real app). The fuzzing
suite (tests/test_api_fuzz.py) reads the document back and checks every answer against it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import attrs
from quart import Quart, current_app, request
from werkzeug.routing import Rule

from api.context import ApiContext
from api.fields import Body, DeclaredBody
from api.schemas import parse_json

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain"

# Error statuses by cause; a route lists those that apply to it. ``document`` adds the
# guard's (``api/guard.py``) everywhere: 403 for a foreign Host or Origin, 401 where a key is
# required; and to a route with a body: 400 malformed or mistyped, 413 too large, 415 not JSON.
GUARD = (403,)
BODY_ERRORS = (400, 413, 415)
LOADING = (503,)  # the model is still loading, or the server is shutting down
UNKNOWN_MODEL = (404,)
GENERATION = (400, 404, 413, 429, 500, 503)  # 500: the runner failed an admitted generation
RETRY_AFTER = frozenset({429, 503})

_REASONS = {
    400: "bad request: malformed JSON, a wrong type or a value out of range",
    401: "missing or invalid API key",
    403: "a Host that is not local while listening on loopback, or an Origin not allowed",
    404: "no such model",
    413: "request body, prompt or worst case too large",
    415: "a body that is not JSON by its content type",
    429: "the request queue is full",
    500: "the generation failed after it was admitted (details in the log, by request id)",
    502: "the registry or the hub failed, or sent a model this store cannot hold",
    503: "loading, or shutting down",
    507: "no space left in the model store",
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
}
_ATTRIBUTE = "__mlxrunner_endpoint__"


@attrs.frozen(kw_only=True)
class Endpoint:
    summary: str
    body: Body | None = None
    media: tuple[str, ...] = (JSON,)
    errors: tuple[int, ...] = ()
    error_schema: Mapping[str, Any] = ERROR_SCHEMA


View = Callable[..., Awaitable[Any]]


def endpoint(
    summary: str,
    *,
    body: Body | None = None,
    parse: Callable[[DeclaredBody], Any] | None = None,
    media: tuple[str, ...] = (JSON,),
    errors: tuple[int, ...] = (),
    error_schema: Mapping[str, Any] = ERROR_SCHEMA,
) -> Callable[[View], View]:
    """Declare a route. With ``body``, the view's first argument is the request's
    ``DeclaredBody``; with ``parse`` too (the route's checks of what can be as large as the
    body: messages, token ids), its second is what ``parse`` made of it, on the same worker
    thread as the decoding when the body is large."""
    spec = Endpoint(
        summary=summary, body=body, media=media, errors=errors, error_schema=error_schema
    )

    def declare(view: View) -> View:
        handler = view if body is None else _reading(body, parse, view)
        setattr(handler, _ATTRIBUTE, spec)
        return handler

    return declare


def _reading(body: Body, parse: Callable[[DeclaredBody], Any] | None, view: View) -> View:
    def declare_and_parse(data: dict[str, Any]) -> tuple[DeclaredBody, Any]:
        declared = body.declare(data)
        return declared, None if parse is None else parse(declared)

    @functools.wraps(view)
    async def handler(**kwargs: Any) -> Any:
        ctx: ApiContext = current_app.extensions["mlxrunner"]
        limiter = ctx.client.cpu_limiter
        _, (declared, parsed) = await parse_json(request, limiter, declare_and_parse)
        if parse is None:
            return await view(declared, **kwargs)
        return await view(declared, parsed, **kwargs)

    return handler


def declared_endpoint(app: Quart, rule: Rule) -> Endpoint:
    spec = getattr(app.view_functions[rule.endpoint], _ATTRIBUTE, None)
    if not isinstance(spec, Endpoint):
        raise LookupError(f"route {rule.rule} ({rule.endpoint}) is not declared with @endpoint")
    return spec


_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def document(
    app: Quart, *, version: str, api_key: bool, public_paths: Collection[str] = ()
) -> dict[str, Any]:
    """The OpenAPI document of every route ``app`` has (HEAD and OPTIONS left implicit)."""
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        spec = declared_endpoint(app, rule)
        secured = api_key and rule.rule not in public_paths
        item = paths.setdefault(_ARGUMENT.sub(r"{\1}", rule.rule), {})
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            item[method.lower()] = _operation(rule, spec, secured=secured)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "mlxrunner", "version": version},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA}},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _operation(rule: Rule, spec: Endpoint, *, secured: bool) -> dict[str, Any]:
    family = rule.endpoint.partition(".")[0] if "." in rule.endpoint else "server"
    errors = {*spec.errors, *GUARD}
    if spec.body is not None:
        errors.update(BODY_ERRORS)
    if secured:
        errors.add(401)
    responses: dict[str, Any] = {
        "200": {"description": "success", "content": {media: {} for media in spec.media}}
    }
    for status in sorted(errors):
        custom = status not in (401, *GUARD) and spec.error_schema is not ERROR_SCHEMA
        schema = dict(spec.error_schema) if custom else {"$ref": "#/components/schemas/Error"}
        response: dict[str, Any] = {
            "description": _REASONS[status],
            "content": {JSON: {"schema": schema}},
        }
        if status in RETRY_AFTER:
            response["headers"] = {
                "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}
            }
        responses[str(status)] = response
    operation: dict[str, Any] = {
        "operationId": rule.endpoint,
        "summary": spec.summary,
        "tags": [family],
        "responses": responses,
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in sorted(rule.arguments)
    ]
    if parameters:
        operation["parameters"] = parameters
    if spec.body is not None:
        schema = spec.body.json_schema()
        operation["requestBody"] = {"content": {JSON: {"schema": schema}}}
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation
