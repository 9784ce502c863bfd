"""Embedding routes: Ollama's ``/api/embed`` and legacy ``/api/embeddings``, OpenAI's
``/v1/embeddings``.

Vectors come from the loaded model (``RunnerClient.embed``: mean-pooled final hidden states,
computed between generation steps). ``/api/embed`` and ``/v1/embeddings`` return unit-norm
vectors; the legacy ``/api/embeddings`` returns them as pooled, not normalised, as Ollama's
legacy route does. OpenAI's ``encoding_format: base64`` is the little-endian float32 bytes of
each vector, base64-encoded. Replies with many values are built off the event loop.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response, jsonify

from actors.embedding import MAX_INPUTS
from actors.messages import Embeddings, EmbedRequest
from api import fields
from api.context import ApiContext
from api.errors import bad_request
from api.fields import MODEL, OPTIONS, DeclaredBody
from api.openapi import GENERATION, endpoint
from api.replies import json_reply
from api.schemas import INT32_MAX

_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}
_OLLAMA_INPUT = {
    "type": ["string", "array", "null"],
    "items": {"type": "string"},
    "maxItems": MAX_INPUTS,
    "description": "a text or a list of texts",
}
_OPENAI_INPUT = {
    "type": ["string", "array"],
    "items": {"anyOf": [{"type": "string"}, _TOKEN_ID, _TOKEN_IDS]},
    "minItems": 1,
    "maxItems": MAX_INPUTS,
    "description": "a text, a list of texts, a list of token ids, or a list of such lists",
}
# Values per reply item as ``json_reply`` counts them (floats encode at C speed).
_VALUES_PER_ITEM = 64


def _ollama_input(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()  # Ollama: an empty text asks for no vector
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"'{key}' must be a string or a list of strings")
    if len(value) > MAX_INPUTS:
        raise bad_request(f"'{key}' holds more than {MAX_INPUTS} inputs")
    return tuple(value)


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _openai_input(body: Mapping[str, Any], key: str) -> tuple[str | tuple[int, ...], ...]:
    value = body.get(key)
    if isinstance(value, str):
        items: list[Any] = [value]
    elif _is_token_ids(value):
        items = [value]  # one input given as token ids
    elif isinstance(value, list) and value:
        items = value
    else:
        raise bad_request(f"'{key}' must be a string, a list of strings or of token id lists")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'{key}' holds more than {MAX_INPUTS} inputs")
    out: list[str | tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request(f"'{key}' holds an empty string")
            out.append(item)
        elif _is_token_ids(item) and all(0 <= t <= INT32_MAX for t in item):
            out.append(tuple(item))
        else:
            raise bad_request(f"'{key}' items must be strings or non-empty token id lists")
    return tuple(out)


INPUT = fields.field("input", _OLLAMA_INPUT, _ollama_input)
TRUNCATE = fields.boolean(
    "truncate", True, description="cut inputs longer than the context (else 400)"
)
KEEP_ALIVE = fields.raw(
    "keep_alive", {"type": ["string", "number", "null"]}, description="accepted, ignored"
)
DIMENSIONS = fields.integer(
    "dimensions", lo=1, hi=INT32_MAX, description="keep the first N values (renormalised)"
)
EMBED = fields.body(MODEL, INPUT, TRUNCATE, DIMENSIONS, OPTIONS, KEEP_ALIVE)
PROMPT = fields.string("prompt", description="the text; empty: no vector")
LEGACY = fields.body(MODEL, PROMPT, OPTIONS, KEEP_ALIVE)
OPENAI_MODEL = fields.string("model", required=True)
OPENAI_INPUT = fields.field("input", _OPENAI_INPUT, _openai_input, required=True)
ENCODING = fields.field(
    "encoding_format",
    {"enum": ["float", "base64", None]},
    fields.string("encoding_format").reader,
    description="base64: little-endian float32 bytes",
)
USER = fields.string("user", description="accepted, ignored")
OPENAI = fields.body(OPENAI_MODEL, OPENAI_INPUT, ENCODING, DIMENSIONS, USER)


def _parse_ollama(body: DeclaredBody) -> tuple[str, ...]:
    return INPUT.read(body)


def _parse_openai(body: DeclaredBody) -> tuple[str | tuple[int, ...], ...]:
    return OPENAI_INPUT.read(body)


def _size(result: Embeddings) -> int:
    return sum(len(v) for v in result.vectors) // _VALUES_PER_ITEM


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("embeddings", __name__)
    limiter = ctx.client.cpu_limiter

    async def embed(request: EmbedRequest) -> Embeddings:
        ctx.check_admitting()
        return await ctx.client.embed(request)

    @bp.post("/api/embed")
    @endpoint(
        "Ollama: L2-normalised embeddings of a text or a list of texts",
        body=EMBED,
        parse=_parse_ollama,
        errors=GENERATION,
    )
    async def ollama_embed(body: DeclaredBody, inputs: tuple[str, ...]) -> Response:
        name = ctx.resolve_model(MODEL.read(body))
        request = EmbedRequest(
            inputs=inputs, truncate=TRUNCATE.read(body), dimensions=DIMENSIONS.read(body)
        )
        if inputs:
            result = await embed(request)
        else:  # Ollama answers no input with no vectors (it loads the model)
            ctx.check_admitting()
            result = Embeddings(vectors=[], prompt_tokens=0, total_duration=0)

        def make() -> dict[str, Any]:
            return {
                "model": name,
                "embeddings": result.vectors,
                "total_duration": result.total_duration,
                "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens,
            }

        return await json_reply(make, _size(result), limiter)

    @bp.post("/api/embeddings")
    @endpoint(
        "Ollama (legacy): the embedding of one text, not normalised",
        body=LEGACY,
        errors=GENERATION,
    )
    async def ollama_embeddings(body: DeclaredBody) -> Response:
        ctx.resolve_model(MODEL.read(body))
        prompt = PROMPT.read(body) or ""
        if not prompt:
            ctx.check_admitting()
            return jsonify({"embedding": []})
        result = await embed(EmbedRequest(inputs=(prompt,), normalize=False))
        return await json_reply(lambda: {"embedding": result.vectors[0]}, _size(result), limiter)

    @bp.post("/v1/embeddings")
    @endpoint(
        "OpenAI: unit-norm embeddings (floats or base64), with token usage",
        body=OPENAI,
        parse=_parse_openai,
        errors=GENERATION,
    )
    async def openai_embeddings(
        body: DeclaredBody, inputs: tuple[str | tuple[int, ...], ...]
    ) -> Response:
        name = ctx.resolve_model(OPENAI_MODEL.read(body))
        encoding = ENCODING.read(body) or "float"
        result = await embed(EmbedRequest(inputs=inputs, dimensions=DIMENSIONS.read(body)))
        encode = _base64 if encoding == "base64" else list

        def make() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": encode(vector)}
                    for i, vector in enumerate(result.vectors)
                ],
                "model": name,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "total_tokens": result.prompt_tokens,
                },
            }

        return await json_reply(make, _size(result), limiter)

    return bp
