"""Ollama's model management: ``/api/create``, ``/api/copy``, ``/api/delete``.

They change the model store (``ApiConfig.models_dir``, when ``manage_models`` allows it:
``mlxrunner serve`` does, an app built for a test does not), not what this server serves: it serves
the one model it loaded at start, and a model created or copied here is served by starting a
server with it (``mlxrunner serve --model NAME``).

- ``POST /api/create``: ``model`` (the new name) and ``from``: a stored model, or a GGUF file
  or HF/MLX model folder on the server's file system; with ``system``, ``template`` (a Jinja
  chat template), ``parameters`` (Ollama's options) and ``messages``, stored as Ollama's
  layers (``runtime.store.profile``). From a stored model without ``quantize`` only those
  layers are written (``runtime.store.editing``, on a worker thread); a file, a folder, or
  ``quantize`` (``q4``/``q8``/``f32``, or Ollama's ``q4_K_M``/``q4_K_S``/``q4_0``/``q8_0``,
  read as MLX's affine 4 and 8 bits) is imported by a child process
  (``actors.import_process``), one at a time. The reply is Ollama's: status lines
  (``{"status": "..."}``, progress with ``total``/``completed``) ending in
  ``{"status": "success"}``, or one such object with ``stream: false``. Errors found before
  the work starts are HTTP errors; a stream that fails ends with ``{"error": "..."}``.
  Ollama's uploaded ``files`` and ``adapters`` are refused (400).
- ``POST /api/copy``: ``source``, ``destination``; the manifest as is (same digest).
- ``DELETE /api/delete``: ``model``; 404 when absent. Blobs another manifest uses stay.

Deleting (or replacing) the model the server serves removes its store entry only: the server
keeps serving it from memory until it stops (its weights were read at load), and cannot load
it again. Refusing would make the one-model server the only place a model cannot be removed
from, while ``mlxrunner rm`` can remove it under a running server anyway; Ollama, which would
unload it, answers every later request with 404 instead, which a one-model server cannot do
and still serve anything.
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import trio
from quart import Blueprint, Response, jsonify

from actors.import_process import open_import
from api import errors, fields
from api.context import ApiContext
from api.errors import ApiError, bad_request, not_found
from api.fields import OPTIONS_SCHEMA, DeclaredBody
from api.native import STREAM, ndjson_line
from api.openapi import JSON, NDJSON, endpoint
from api.schemas import generation_options
from runtime.errors import ModelLoadError, ModelNotFoundError, RuntimeInputError
from runtime.store.editing import ProfileChanges, copy_model, derive_model
from runtime.store.layout import Store
from runtime.store.names import InvalidNameError, ModelName
from runtime.store.profile import check_messages, check_template

# Ollama's quantization names, read as the MLX affine ones this store writes.
QUANTIZE = {
    "q4": "q4",
    "q8": "q8",
    "f32": "f32",
    "q4_k_m": "q4",
    "q4_k_s": "q4",
    "q4_0": "q4",
    "q8_0": "q8",
}
_STORE_ERRORS = (400, 404, 500, 507)  # 500: the store cannot be written
_NAME = {"type": "string", "minLength": 1}

MODEL = fields.string("model", required=True, description="the name to create")
FROM = fields.string("from", description="a stored model's name, or a GGUF file or model folder")
QUANTIZE_FIELD = fields.raw("quantize", {"enum": [None, *QUANTIZE, "Q4_K_M", "Q4_K_S"]})
SYSTEM = fields.string("system")
TEMPLATE = fields.string("template", description="a Jinja chat template")
PARAMETERS = fields.raw("parameters", {**OPTIONS_SCHEMA, "type": ["object", "null"]})
MESSAGES = fields.raw("messages", {"type": ["array", "null"]})
LICENSE = fields.raw("license", {"type": ["string", "array", "null"], "items": {"type": "string"}})
FILES = fields.raw("files", {"type": ["object", "null"], "maxProperties": 0})
ADAPTERS = fields.raw("adapters", {"type": ["object", "null"], "maxProperties": 0})
CREATE = fields.body(
    MODEL,
    FROM,
    QUANTIZE_FIELD,
    SYSTEM,
    TEMPLATE,
    PARAMETERS,
    MESSAGES,
    LICENSE,
    FILES,
    ADAPTERS,
    STREAM,
)
SOURCE = fields.field("source", _NAME, fields.string("source").reader, required=True)
DESTINATION = fields.field("destination", _NAME, fields.string("destination").reader, required=True)
COPY = fields.body(SOURCE, DESTINATION)
DELETE_MODEL = fields.string("model", description="the model to delete")
DELETE_NAME = fields.string("name", description="an older name of 'model'")
DELETE = fields.body(DELETE_MODEL, DELETE_NAME)

Status = dict[str, Any]


def _name(text: str | None, what: str) -> str:
    if not text:
        raise bad_request(f"'{what}' is required")
    try:
        return ModelName.parse(text).short
    except InvalidNameError as exc:
        raise bad_request(str(exc)) from None


def _changes(body: DeclaredBody) -> ProfileChanges:
    """The profile the request asks for, every value checked (400 otherwise)."""
    try:
        template = TEMPLATE.read(body)
        parameters = PARAMETERS.read(body)
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise bad_request("'parameters' must be an object")
            generation_options(parameters)  # as a request's options: the same checks
        raw_messages = MESSAGES.read(body)
        licenses = LICENSE.read(body)
        if isinstance(licenses, str):
            licenses = [licenses]
        if licenses is not None and not (
            isinstance(licenses, list) and all(isinstance(x, str) for x in licenses)
        ):
            raise bad_request("'license' must be a string or a list of strings")
        return ProfileChanges(
            licenses=tuple(x for x in licenses or () if x),
            system=SYSTEM.read(body),
            template=check_template(template) if template else None,
            parameters=parameters,
            messages=None if raw_messages is None else check_messages(raw_messages),
        )
    except RuntimeInputError as exc:
        raise bad_request(str(exc)) from None


def _quantize(body: DeclaredBody) -> str | None:
    value = QUANTIZE_FIELD.read(body)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.lower() not in QUANTIZE:
        raise bad_request(f"'quantize' must be one of {', '.join(QUANTIZE)}")
    return QUANTIZE[value.lower()]


def _store_error(exc: BaseException) -> ApiError:
    """A store operation's failure as the client's error (anything else propagates)."""
    match exc:
        case ModelNotFoundError():
            return not_found(str(exc))
        case ModelLoadError() | RuntimeInputError():
            return bad_request(str(exc))
        case OSError(errno=errno.ENOSPC | errno.EDQUOT):
            return ApiError(507, f"no space left in the model store ({exc.strerror})")
        case OSError():
            return ApiError(500, f"the model store: {exc.strerror or exc}")
        case _:
            raise exc


def _is_path(source: str) -> bool:
    # runtime.models.source.looks_like_path's rule, without importing MLX here.
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or "\\" in source


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("model_admin", __name__)
    imports = trio.CapacityLimiter(1)  # an import holds a whole model in memory

    def store() -> Store:
        if not ctx.config.manage_models:
            raise bad_request("model management is off on this server")
        return Store.at(ctx.config.models_dir)

    async def in_thread(fn: Callable[[], Any]) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, limiter=ctx.client.cpu_limiter)
        except (RuntimeInputError, OSError) as exc:
            raise _store_error(exc) from None

    async def imported(source: str, name: str, quantize: str | None) -> AsyncGenerator[Status]:
        """Run the child import, its progress as status lines; ``ApiError`` if it fails."""
        async with imports:
            child = await open_import(source, name, models_dir=str(store().root), quantize=quantize)
            try:
                last = -1
                while (event := await child.next_event()) is not None:
                    if "error" in event:
                        status = 404 if event.get("not_found") else 400
                        raise ApiError(status, str(event["error"]))
                    if event.get("done"):
                        await child.wait()  # it is exiting: no SIGINT for it
                        return
                    total, done = event.get("total_bytes", 0), event.get("done_bytes", 0)
                    if event.get("phase") == "write" and total > 0:
                        percent = math.floor(100 * done / total)
                        if percent != last:  # at most a hundred lines
                            last = percent
                            yield {"status": "writing tensors", "total": total, "completed": done}
                    elif event.get("phase") == "read":
                        yield {"status": f"reading {source}"}
                code = await child.wait()
                raise ApiError(500, f"the import of {source} failed (exit status {code})")
            finally:
                with trio.CancelScope(shield=True):
                    await child.stop()

    async def create_statuses(body: DeclaredBody) -> AsyncGenerator[Status]:
        ctx.check_admitting()  # a stopping server starts no import
        name = _name(MODEL.read(body), "model")
        source = FROM.read(body)
        if not source:
            raise bad_request("'from' is required: a model name, or a GGUF file or model folder")
        if FILES.read(body) or ADAPTERS.read(body):
            raise bad_request(
                "uploaded 'files' and 'adapters' are not supported; give 'from' a GGUF file or "
                "model folder the server can read"
            )
        changes = _changes(body)
        quantize = _quantize(body)
        base = source
        if _is_path(source) or quantize is not None:
            if not _is_path(source):
                source = _name(source, "from")
            # Closed with this generator, wherever it is left: the child is stopped at once.
            async with contextlib.aclosing(imported(source, name, quantize)) as progress:
                async for status in progress:
                    yield status
            if changes.is_empty():
                yield {"status": "success"}
                return
            base = name
        else:
            base = _name(source, "from")
        statuses: list[Status] = []
        await in_thread(
            lambda: derive_model(
                store(), name, base, changes, lambda s: statuses.append({"status": s})
            )
        )
        for status in statuses:
            yield status

    @bp.post("/api/create")
    @endpoint(
        "Ollama: create a model from a stored one, a GGUF file or a model folder",
        body=CREATE,
        media=(NDJSON, JSON),
        errors=_STORE_ERRORS,
    )
    async def create(body: DeclaredBody) -> Response:
        statuses = create_statuses(body)
        # The first status comes before any header: errors in the request stay HTTP errors.
        try:
            first = await anext(statuses)
        except StopAsyncIteration:
            first = {"status": "success"}
        if not STREAM.read(body):
            last = first
            async with contextlib.aclosing(statuses):  # closed (the child stopped) if cancelled
                async for status in statuses:
                    last = status
            return jsonify(last)

        request_id = errors.request_id()

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield ndjson_line(first)
                async for status in statuses:
                    yield ndjson_line(status)
            except ApiError as exc:  # after the header: Ollama's error line
                yield ndjson_line(errors.stream_error_payload(exc, request_id))
            finally:
                await statuses.aclose()

        response = Response(lines(), mimetype=NDJSON)
        response.timeout = None  # an import can take longer than Quart's response timeout
        return response

    @bp.post("/api/copy")
    @endpoint("Ollama: copy a model under another name", body=COPY, errors=_STORE_ERRORS)
    async def copy(body: DeclaredBody) -> Response:
        source = _name(SOURCE.read(body), "source")
        destination = _name(DESTINATION.read(body), "destination")
        await in_thread(lambda: copy_model(store(), source, destination))
        return jsonify({})

    @bp.delete("/api/delete")
    @endpoint("Ollama: delete a model from the store", body=DELETE, errors=_STORE_ERRORS)
    async def delete(body: DeclaredBody) -> Response:
        name = _name(DELETE_MODEL.read(body) or DELETE_NAME.read(body), "model")
        await in_thread(lambda: store().remove(name))
        return jsonify({})

    return bp
