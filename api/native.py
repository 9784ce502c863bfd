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
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, jsonify, request

from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    GenerationCut,
    GenerationError,
    Logprob,
)
from api.context import ApiContext
from api.errors import (
    RETRY_AFTER_LOADING,
    RETRY_AFTER_SHUTTING_DOWN,
    bad_request,
    stream_error_payload,
)
from api.generation import GenerationReader, StreamBody, open_generation
from api.replies import json_reply, whole_reply_size
from api.schemas import (
    INT32_MAX,
    generation_options,
    get_bool,
    get_int,
    get_object,
    get_token_ids,
    get_top_logprobs,
    parse_json,
    read_json,
)

NDJSON = "application/x-ndjson"


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


def _detokenize_ids(body: dict[str, Any]) -> list[int] | None:
    return get_token_ids(body, "tokens")


def _parse_completion(body: dict[str, Any]) -> GenerateRequest:
    prompt = body.get("prompt")
    tokens = get_token_ids(body, "prompt") if isinstance(prompt, list) else None
    if tokens is None and not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string or a list of token ids")
    max_tokens = get_int(body, "max_tokens", hi=INT32_MAX)
    options = generation_options(get_object(body, "options"), num_predict=max_tokens)
    logprobs = get_bool(body, "logprobs", False)
    return GenerateRequest(
        prompt=prompt if tokens is None else None,
        tokens=tuple(tokens) if tokens is not None else None,
        options=options,
        logprobs=logprobs,
        top_logprobs=get_top_logprobs(body),
    )


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("native", __name__)

    @bp.post("/completion")
    async def completion() -> Response:
        body, req = await parse_json(request, ctx.client.cpu_limiter, _parse_completion)
        stream = get_bool(body, "stream", True)
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
    async def tokenize() -> Response:
        body = await read_json(request, ctx.client.cpu_limiter)
        text = next((body[k] for k in ("content", "text", "prompt") if k in body), None)
        if not isinstance(text, str):
            raise bad_request("'content' must be a string")
        ctx.resolve_model(body.get("model") if isinstance(body.get("model"), str) else None)
        tokens = await ctx.client.tokenize(text)
        return await json_reply(lambda: {"tokens": tokens}, len(tokens), ctx.client.cpu_limiter)

    @bp.post("/detokenize")
    async def detokenize() -> Response:
        body, tokens = await parse_json(request, ctx.client.cpu_limiter, _detokenize_ids)
        if tokens is None:
            raise bad_request("'tokens' must be a list of integers")
        ctx.resolve_model(body.get("model") if isinstance(body.get("model"), str) else None)
        content = await ctx.client.detokenize(tokens)
        size = len(content) // 1024
        return await json_reply(lambda: {"content": content}, size, ctx.client.cpu_limiter)

    return bp
