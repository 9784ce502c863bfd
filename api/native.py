"""The native runner routes: ``POST /completion`` (NDJSON), ``/health``, ``/tokenize``,
``/detokenize``.

``/completion`` speaks the seed runner's wire: one object per chunk with ``content`` and
``token``; the last has ``done: true``, an integer ``done_reason`` (0 stop, 1 length) and
Ollama's counters in nanoseconds. A stream cut short (shutdown, a stalled reader, never
admitted) ends instead with ``done: true``, ``done_reason: 2``, the counters and an
``error``; one that failed with ``{"error": ...}``. Without streaming both are HTTP errors
(503 with Retry-After, 500).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from quart import Blueprint, Response, jsonify

from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    GenerationCut,
    GenerationError,
    Logprob,
)
from api import fields
from api.context import ApiContext
from api.errors import (
    RETRY_AFTER_LOADING,
    RETRY_AFTER_SHUTTING_DOWN,
    bad_request,
    stream_error_payload,
)
from api.fields import LOGPROBS, MODEL, OPTIONS, TOP_LOGPROBS, DeclaredBody
from api.generation import GenerationReader, StreamBody, open_generation
from api.openapi import GENERATION, JSON, LOADING, NDJSON, UNKNOWN_MODEL, endpoint
from api.replies import json_reply, whole_reply_size
from api.schemas import INT32_MAX, generation_options, get_str, get_token_ids
from api.structured import FORMAT

STREAM = fields.boolean("stream", True)


def _text_or_tokens(body: Mapping[str, Any], key: str) -> str | list[int]:
    value = body.get(key)
    tokens = get_token_ids(body, key) if isinstance(value, list) else None
    if tokens is not None:
        return tokens
    if not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string or a list of token ids")
    return value


PROMPT = fields.field(
    "prompt",
    {"oneOf": [{"type": "string"}, fields.TOKEN_IDS_SCHEMA]},
    _text_or_tokens,
    required=True,
)
MAX_TOKENS = fields.integer("max_tokens", hi=INT32_MAX, description="options.num_predict")
COMPLETION = fields.body(PROMPT, MAX_TOKENS, OPTIONS, STREAM, LOGPROBS, TOP_LOGPROBS, FORMAT)
# /tokenize takes its text under the first of these keys present.
_TEXT_KEYS = ("content", "text", "prompt")
TOKENIZE = fields.body(MODEL, *(fields.string(key) for key in _TEXT_KEYS))
TOKENS = fields.token_ids("tokens", required=True)
DETOKENIZE = fields.body(MODEL, TOKENS)
HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "loading", "shutting_down"]},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
    },
}


def logprobs_json(logprobs: tuple[Logprob, ...]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "token_id": lp.token_id,
            "logprob": lp.logprob,
            "top_logprobs": [{"token": t, "logprob": p} for t, p in lp.top],
        }
        for lp in logprobs
    ]


def stats_json(chunk: Chunk) -> dict[str, Any]:
    return {
        "total_duration": chunk.total_duration,
        "load_duration": chunk.load_duration,
        "prompt_eval_count": chunk.prompt_eval_count,
        "prompt_eval_duration": chunk.prompt_eval_duration,
        "eval_count": chunk.eval_count,
        "eval_duration": chunk.eval_duration,
    }


def _chunk_json(chunk: Chunk, *, logprobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "content": chunk.content,
        "token": chunk.tokens[-1] if chunk.tokens else None,
        "tokens": list(chunk.tokens),
        "done": chunk.done,
    }
    if logprobs:
        out["logprobs"] = logprobs_json(chunk.logprobs)
    if chunk.done:
        reason = chunk.done_reason if chunk.done_reason is not None else DoneReason.STOP
        out["done_reason"] = int(reason)
        out.update(stats_json(chunk))
    return out


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson_response(generation: GenerationReader, pieces: AsyncIterator[bytes]) -> Response:
    response = Response(StreamBody(generation, pieces), mimetype=NDJSON)
    response.timeout = None  # a long generation must not be cut by Quart's response timeout
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _parse_completion(body: DeclaredBody) -> GenerateRequest:
    prompt = PROMPT.read(body)
    options = generation_options(OPTIONS.read(body), num_predict=MAX_TOKENS.read(body))
    return GenerateRequest(
        prompt=prompt if isinstance(prompt, str) else None,
        tokens=None if isinstance(prompt, str) else tuple(prompt),
        options=options,
        logprobs=LOGPROBS.read(body),
        top_logprobs=TOP_LOGPROBS.read(body),
        format=FORMAT.read(body),
    )


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("native", __name__)

    @bp.post("/completion")
    @endpoint(
        "Generate from a prompt: NDJSON chunks, or one JSON object when not streaming",
        body=COMPLETION,
        parse=_parse_completion,
        media=(NDJSON, JSON),
        errors=GENERATION,
    )
    async def completion(body: DeclaredBody, req: GenerateRequest) -> Response:
        stream = STREAM.read(body)
        generation = await open_generation(ctx, req)
        if stream:

            async def pieces() -> AsyncIterator[bytes]:
                try:
                    async for chunk in generation:
                        yield ndjson_line(_chunk_json(chunk, logprobs=req.logprobs))
                except GenerationCut as cut:
                    last = _chunk_json(cut.final, logprobs=req.logprobs)
                    error = stream_error_payload(cut, generation.request_id)
                    yield ndjson_line({**last, **error})
                except GenerationError as exc:
                    yield ndjson_line(stream_error_payload(exc, generation.request_id))
                finally:
                    generation.close()

            return ndjson_response(generation, pieces())

        whole = await generation.collect()
        return await json_reply(
            lambda: _chunk_json(whole, logprobs=req.logprobs),
            whole_reply_size(whole),
            ctx.client.cpu_limiter,
        )

    @bp.get("/health")
    @endpoint(
        "Readiness: ok, loading (with progress) or shutting down",
        errors=LOADING,
        error_schema=HEALTH_SCHEMA,
    )
    async def health() -> Response:
        h = ctx.client.health()
        if ctx.draining or h.status == "shutting_down":
            response = jsonify({"status": "shutting_down"})
            response.status_code = 503
            response.headers["Retry-After"] = str(RETRY_AFTER_SHUTTING_DOWN)
        elif h.status == "loading":
            response = jsonify({"status": "loading", "progress": h.progress})
            response.status_code = 503
            response.headers["Retry-After"] = str(RETRY_AFTER_LOADING)
        else:
            response = jsonify({"status": "ok"})
        return response

    @bp.post("/tokenize")
    @endpoint("Token ids of a text", body=TOKENIZE, errors=LOADING + UNKNOWN_MODEL)
    async def tokenize(body: DeclaredBody) -> Response:
        key = next((k for k in _TEXT_KEYS if k in body), "content")
        text = get_str(body, key)
        if text is None:
            raise bad_request("'content' must be a string")
        ctx.resolve_model(MODEL.read(body))
        tokens = await ctx.client.tokenize(text)
        return await json_reply(lambda: {"tokens": tokens}, len(tokens), ctx.client.cpu_limiter)

    @bp.post("/detokenize")
    @endpoint(
        "The text of token ids",
        body=DETOKENIZE,
        parse=TOKENS.read,
        errors=LOADING + UNKNOWN_MODEL,
    )
    async def detokenize(body: DeclaredBody, tokens: list[int] | None) -> Response:
        if tokens is None:
            raise bad_request("'tokens' must be a list of integers")
        ctx.resolve_model(MODEL.read(body))
        content = await ctx.client.detokenize(tokens)
        size = len(content) // 1024
        return await json_reply(lambda: {"content": content}, size, ctx.client.cpu_limiter)

    return bp
