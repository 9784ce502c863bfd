"""Ollama's API: ``/api/generate``, ``/api/chat`` (NDJSON streams), ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``.

Field names, defaults (``stream: true``), the empty-prompt "load" reply and the final
statistics follow Ollama, so the official ``ollama`` client works against this server. A
stream cut short or failed ends with Ollama's error line, ``{"error": "..."}``, which its
client raises as ``ResponseError``; without streaming the same is an HTTP error. What
``/api/tags``, ``/api/show`` and ``/api/ps`` say about a model is built in ``api.ollama_models``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import trio
from quart import Blueprint, Response, jsonify

from actors.messages import (
    ChatMessage,
    Chunk,
    DoneReason,
    GenerateRequest,
    GenerationError,
)
from api import fields, model_defaults
from api.context import ApiContext
from api.errors import bad_request, stream_error_payload
from api.fields import LOGPROBS, MODEL, OPTIONS, TOP_LOGPROBS, DeclaredBody
from api.generation import open_generation
from api.native import STREAM, ndjson_line, ndjson_response, stats_json
from api.ollama_models import loaded_entry, served_entry, show_json, store_listing, stored_entry
from api.openapi import GENERATION, JSON, LOADING, NDJSON, TEXT, UNKNOWN_MODEL, endpoint
from api.replies import json_reply, whole_reply_size
from api.schemas import generation_options
from api.structured import FORMAT
from api.tool_replies import ToolCallStream, ollama_tool_calls
from runtime.text.thinking import supports_thinking

# A cut generation never gets a done line: its stream ends with an error line instead.
DONE_REASONS = {DoneReason.STOP: "stop", DoneReason.LENGTH: "length"}


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


THINK = fields.raw(
    "think",
    {"enum": [None, True, False, "", "low", "medium", "high"]},
    description="thinking models: think first (true, or a level) or not (false); "
    "null: the model's default. The thinking comes back apart from the content",
)
_EMPTY_STRING = {"type": ["string", "null"], "maxLength": 0}
SUFFIX = fields.field("suffix", _EMPTY_STRING, fields.string("suffix").reader)
TEMPLATE = fields.field("template", _EMPTY_STRING, fields.string("template").reader)
IMAGES = fields.raw("images", {"type": ["array", "null"], "maxItems": 0})
PROMPT = fields.string("prompt", description="empty (and no system): load the model")
SYSTEM = fields.string("system")
RAW = fields.boolean("raw", False, description="the prompt as is, without the chat template")
MESSAGES = fields.messages()
_SHARED = (MODEL, FORMAT, THINK, OPTIONS, STREAM, LOGPROBS, TOP_LOGPROBS)
GENERATE = fields.body(PROMPT, SYSTEM, SUFFIX, TEMPLATE, IMAGES, RAW, *_SHARED)
CHAT = fields.body(MESSAGES, fields.TOOLS, *_SHARED)
NAME = fields.string("name", description="an older name of 'model'")
SHOW = fields.body(MODEL, NAME)


ChatParts = tuple[tuple[ChatMessage, ...], tuple[Mapping[str, Any], ...] | None]


def _chat_parts(body: DeclaredBody) -> ChatParts:
    """The messages and tools (as long as the body allows: on the decoding thread)."""
    return MESSAGES.read(body), fields.TOOLS.read(body)


def _common(body: DeclaredBody) -> tuple[DeclaredBody, bool]:
    """Validate what /api/generate and /api/chat share; (options, stream)."""
    return OPTIONS.read(body), STREAM.read(body)


def _think(ctx: ApiContext, body: DeclaredBody) -> bool | None:
    """The request's ``think`` (a level counts as true); 400 when the model cannot think."""
    think = THINK.read(body)
    if think in (None, ""):
        return None
    if think is not False and not supports_thinking(ctx.model_info().chat_template):
        raise bad_request("this model does not support thinking")
    return think is not False


# The route-specific part of each line: {"response": text} or {"message": {...}}, given the
# content and the thinking.
Render = Callable[[str, str], dict[str, Any]]


def _line(
    name: str,
    render: Render,
    chunk: Chunk,
    logprobs: list[dict[str, Any]] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out = {
        "model": name,
        "created_at": now_rfc3339(),
        **render(chunk.content, chunk.thinking),
        "done": chunk.done,
    }
    if tool_calls:
        out["message"]["tool_calls"] = tool_calls
    if logprobs is not None:
        out["logprobs"] = logprobs
    if chunk.done:
        reason = chunk.done_reason if chunk.done_reason is not None else DoneReason.STOP
        out.update({"done_reason": DONE_REASONS[reason], **stats_json(chunk)})
    return out


async def _respond(
    ctx: ApiContext, req: GenerateRequest, name: str, stream: bool, render: Render
) -> Response:
    """The NDJSON stream, or one object with the whole text and the final statistics."""
    generation = await open_generation(ctx, req)
    tools = ToolCallStream(ctx, req)
    if stream:

        async def pieces() -> AsyncIterator[bytes]:
            try:
                async for raw in generation:
                    before = tools.count
                    chunk, calls = tools.chunk(raw)
                    if chunk.content or chunk.thinking or chunk.done or chunk.logprobs or calls:
                        lps = _logprobs(chunk) if req.logprobs else None
                        shaped = ollama_tool_calls(calls, before)
                        yield ndjson_line(_line(name, render, chunk, lps, shaped))
            except GenerationError as exc:  # failed, or cut short: Ollama's error line
                yield ndjson_line(stream_error_payload(exc, generation.request_id))
            finally:
                generation.close()

        return ndjson_response(generation, pieces())

    whole, calls = tools.whole(await generation.collect())

    def reply() -> dict[str, Any]:
        lps = _logprobs(whole) if req.logprobs else None
        return _line(name, render, whole, lps, ollama_tool_calls(calls, 0))

    return await json_reply(reply, whole_reply_size(whole), ctx.client.cpu_limiter)


def _load_reply(name: str, render: Render) -> Response:
    # Ollama answers an empty prompt by loading the model and returning at once.
    return jsonify(
        {
            "model": name,
            "created_at": now_rfc3339(),
            **render("", ""),
            "done": True,
            "done_reason": "load",
        }
    )


def _response_text(content: str, thinking: str) -> dict[str, Any]:
    # Ollama leaves "thinking" out when there is none.
    return {"response": content, **({"thinking": thinking} if thinking else {})}


def _assistant_message(content: str, thinking: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    return {"message": message}


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("ollama", __name__)

    @bp.post("/api/generate")
    @endpoint(
        "Ollama: generate from a prompt (NDJSON stream by default)",
        body=GENERATE,
        media=(NDJSON, JSON),
        errors=GENERATION,
    )
    async def generate(body: DeclaredBody) -> Response:
        name = ctx.resolve_model(MODEL.read(body))
        options, stream = _common(body)
        think = _think(ctx, body)
        prompt = PROMPT.read(body) or ""
        system = SYSTEM.read(body)
        if SUFFIX.read(body):
            raise bad_request("'suffix' (fill-in-the-middle) is not supported by this model")
        if TEMPLATE.read(body):
            raise bad_request("a custom 'template' is not supported; use 'raw' instead")
        if IMAGES.read(body):
            raise bad_request("this model does not support image input")
        raw = RAW.read(body)
        if not prompt and not system:
            ctx.check_admitting()
            return _load_reply(name, _response_text)
        stored = () if raw else model_defaults.messages(ctx, ())
        req = GenerateRequest(
            # The model's messages, then the prompt as the user's turn.
            prompt=None if stored else prompt,
            messages=(*stored, ChatMessage(role="user", content=prompt)) if stored else None,
            system=None if raw else model_defaults.system(ctx, system),
            template=not raw,
            options=generation_options(model_defaults.options(ctx, options)),
            logprobs=LOGPROBS.read(body),
            top_logprobs=TOP_LOGPROBS.read(body),
            think=think,
            separate_thinking=True,
            format=FORMAT.read(body),
        )
        return await _respond(ctx, req, name, stream, _response_text)

    @bp.post("/api/chat")
    @endpoint(
        "Ollama: the assistant's next message (NDJSON stream by default)",
        body=CHAT,
        parse=_chat_parts,
        media=(NDJSON, JSON),
        errors=GENERATION,
    )
    async def chat(body: DeclaredBody, parts: ChatParts) -> Response:
        name = ctx.resolve_model(MODEL.read(body))
        options, stream = _common(body)
        think = _think(ctx, body)
        messages, tools = parts
        if not messages:
            ctx.check_admitting()
            return _load_reply(name, _assistant_message)
        req = GenerateRequest(
            messages=model_defaults.messages(ctx, messages),
            system=model_defaults.system(ctx, None),
            tools=tools,
            options=generation_options(model_defaults.options(ctx, options)),
            logprobs=LOGPROBS.read(body),
            top_logprobs=TOP_LOGPROBS.read(body),
            think=think,
            separate_thinking=True,
            format=FORMAT.read(body),
        )
        return await _respond(ctx, req, name, stream, _assistant_message)

    @bp.get("/api/tags")
    @endpoint(
        "Ollama: the served model, then the others in the server's store (pulled, created)",
        errors=LOADING,
    )
    async def tags() -> Response:
        info = ctx.model_info()
        served = ctx.served_name()
        entries = [served_entry(info, served)]
        if ctx.config.manage_models or ctx.config.allow_pull:  # the server keeps a store
            stored = await trio.to_thread.run_sync(
                store_listing, ctx.config.models_dir, limiter=ctx.client.cpu_limiter
            )
            entries += [stored_entry(e) for e in stored if not ctx.serves(e.name)]
        return jsonify({"models": entries})

    @bp.post("/api/show")
    @endpoint("Ollama: a model's details", body=SHOW, errors=LOADING + UNKNOWN_MODEL)
    async def show(body: DeclaredBody) -> Response:
        requested = MODEL.read(body) or NAME.read(body)
        if not requested:
            raise bad_request("'model' is required")
        name = ctx.resolve_model(requested)
        return jsonify(show_json(ctx.model_info(), name))

    @bp.get("/api/ps")
    @endpoint("Ollama: the loaded models (none while loading)")
    async def ps() -> Response:
        if ctx.client.health().status != "ok":
            return jsonify({"models": []})
        return jsonify({"models": [loaded_entry(ctx.model_info(), ctx.served_name())]})

    @bp.get("/api/version")
    @endpoint("Ollama: the server's version")
    async def version() -> Response:
        return jsonify({"version": ctx.config.version})

    @bp.route("/", methods=["GET", "HEAD"])
    @endpoint("Ollama's liveness text", media=(TEXT,))
    async def root() -> Response:
        return Response("mlxrunner is running", content_type="text/plain")

    return bp


def _logprobs(chunk: Chunk) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token.encode()),
            "top_logprobs": [
                {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top
            ],
        }
        for lp in chunk.logprobs
    ]
