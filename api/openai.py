"""OpenAI's API: ``/v1/completions``, ``/v1/chat/completions`` (SSE when streaming) and
``/v1/models``.

OpenAI's option names map onto Ollama's (``max_tokens`` -> ``num_predict``; temperature and
top_p default to 1 as in OpenAI and Ollama's compatibility layer). Streams are
``data: {json}`` events ending in ``data: [DONE]``; with ``stream_options.include_usage`` a
last event carries ``usage`` and no choices. A stream cut short or failed ends instead with an
error event, ``data: {"error": {"message", "type", "code"}}``, and no ``finish_reason`` or
``[DONE]``; without streaming the same is an HTTP error (503 with Retry-After, or 500). The
completion objects and their choices are rendered by ``api.openai_replies``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
from quart import Blueprint, Response, jsonify

from actors.messages import (
    ChatMessage,
    Chunk,
    GenerateRequest,
    GenerationError,
    GenerationOptions,
    UnavailableError,
)
from api import fields, model_defaults
from api.choices import MAX_CHOICES, Choices, collect, interleave, open_choices, usage
from api.context import ApiContext
from api.errors import bad_request, openai_stream_error
from api.fields import LOGPROBS, MODEL, TOOLS, TOP_LOGPROBS, DeclaredBody, Field
from api.generation import StreamBody
from api.openai_features import BEST_OF, ECHO, LOGIT_BIAS, SUFFIX, check_unsupported, echo_text
from api.openai_replies import ReplyShape, finish_reason, sse_event
from api.openapi import GENERATION, JSON, LOADING, SSE, UNKNOWN_MODEL, endpoint
from api.replies import json_reply, whole_reply_size
from api.schemas import INT32_MAX, generation_options, get_bool, get_token_ids
from api.structured import RESPONSE_FORMAT
from api.tool_replies import (
    TOOL_CHOICE,
    ToolCallStream,
    chosen_tools,
    openai_finish,
    openai_tool_calls,
)
from runtime.engine.options import MIN_TOP_P

_OLLAMA_EXTRAS = ("top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "num_ctx")

N = fields.integer(
    "n", 1, lo=1, hi=MAX_CHOICES, description="choices: one computed prompt; seed + i for choice i"
)
TEMPERATURE = fields.number("temperature", 1.0, lo=0.0, hi=2.0)
TOP_P = fields.number("top_p", 1.0, lo=0.0, hi=1.0)
PRESENCE_PENALTY = fields.number("presence_penalty", 0.0, lo=-2.0, hi=2.0)
FREQUENCY_PENALTY = fields.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0)
# Passed on to Ollama's options, which check them.
SEED = fields.raw("seed", fields.OPTIONS_SCHEMA["properties"]["seed"])
EXTRAS = tuple(fields.raw(key, fields.OPTIONS_SCHEMA["properties"][key]) for key in _OLLAMA_EXTRAS)
MAX_TOKENS = fields.integer("max_tokens", lo=1, hi=INT32_MAX)
MAX_COMPLETION_TOKENS = fields.integer("max_completion_tokens", lo=1, hi=INT32_MAX)
STOP = fields.stop()
STREAM = fields.boolean("stream", False, description="server-sent events")
STREAM_OPTIONS = fields.obj(
    "stream_options", {"include_usage": fields.boolean("include_usage", False)}
)
_SHARED: tuple[Field[Any], ...] = (
    MODEL,
    N,
    TEMPERATURE,
    TOP_P,
    PRESENCE_PENALTY,
    FREQUENCY_PENALTY,
    SEED,
    *EXTRAS,
    STOP,
    RESPONSE_FORMAT,
    STREAM,
    STREAM_OPTIONS,
    MAX_TOKENS,
    LOGIT_BIAS,
)
MESSAGES = fields.messages(required=True)
CHAT = fields.body(
    MESSAGES, TOOLS, TOOL_CHOICE, LOGPROBS, TOP_LOGPROBS, MAX_COMPLETION_TOKENS, *_SHARED
)
ChatParts = tuple[tuple[ChatMessage, ...], tuple[Mapping[str, Any], ...] | None]
Prompt = tuple[str | None, tuple[int, ...] | None]


def _chat_parts(body: DeclaredBody) -> ChatParts:
    """The messages and tools (as long as the body allows: on the decoding thread)."""
    return MESSAGES.read(body), TOOLS.read(body)


def _completion_prompt(body: Mapping[str, Any], key: str) -> Prompt:
    prompt = body.get(key)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list):
        tokens = get_token_ids({key: prompt}, key)
        if tokens:
            return None, tuple(tokens)
    raise bad_request("'prompt' must be a string, a list of one string, or a list of token ids")


_TOKENS = {**fields.TOKEN_IDS_SCHEMA, "minItems": 1}
PROMPT = fields.field(
    "prompt",
    {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            _TOKENS,
            {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 1},
        ]
    },
    _completion_prompt,
    required=True,
)
TEXT_LOGPROBS = fields.integer("logprobs", lo=0, hi=5, description="how many top logprobs")
COMPLETIONS = fields.body(PROMPT, ECHO, SUFFIX, BEST_OF, TEXT_LOGPROBS, *_SHARED)


def _options(
    body: DeclaredBody,
    max_tokens: tuple[Field[int | None], ...],
    defaults: Mapping[str, Any] | None = None,
) -> GenerationOptions:
    """``GenerationOptions`` from OpenAI's names; the first of ``max_tokens`` given wins.

    ``defaults``: the model's parameters, for the options OpenAI's request does not set (as
    Ollama, OpenAI's own defaults for temperature and top_p win over the model's).
    """
    options: dict[str, Any] = {
        "temperature": TEMPERATURE.read(body),
        "top_p": TOP_P.read(body),
        "presence_penalty": PRESENCE_PENALTY.read(body),
        "frequency_penalty": FREQUENCY_PENALTY.read(body),
        "seed": SEED.read(body),
    }
    # OpenAI's 0 (or anything that small) is "only the likeliest token": Ollama's range
    # excludes 0, and MIN_TOP_P already keeps just that one.
    options["top_p"] = max(options["top_p"], MIN_TOP_P)
    for extra in EXTRAS:  # Ollama's compatibility layer accepts these too
        if extra.name in body:
            options[extra.name] = extra.read(body)
    given = {key: value for key, value in options.items() if value is not None}
    options = {**(defaults or {}), **given}
    limits = (f.read(body) for f in max_tokens)
    num_predict = next((n for n in limits if n is not None), None)
    generation = generation_options(options, num_predict=num_predict, stop=STOP.read(body))
    return attrs.evolve(generation, logit_bias=LOGIT_BIAS.read(body))


async def _respond(
    ctx: ApiContext, req: GenerateRequest, shape: ReplyShape, body: DeclaredBody
) -> Response:
    stream = STREAM.read(body)
    include_usage = stream and get_bool(STREAM_OPTIONS.read(body), "include_usage", False)
    choices = await open_choices(ctx, req, N.read(body) or 1)
    tools = [ToolCallStream(ctx, req) for _ in choices.readers]  # each choice its own calls
    if stream:
        return _sse_response(choices, _stream(choices, shape, include_usage, tools))
    parsed = [t.whole(w) for t, w in zip(tools, await collect(choices), strict=True)]
    wholes = [w for w, _ in parsed]

    def reply() -> dict[str, Any]:
        rendered = [
            shape.choice(
                i,
                w.content,
                list(w.logprobs),
                openai_finish(finish_reason(w), w, bool(calls)),
                delta=False,
                thinking=w.thinking,
                tool_calls=openai_tool_calls(calls, 0, delta=False),
            )
            for i, (w, calls) in enumerate(parsed)
        ]
        return {**shape.envelope(shape.object, rendered), "usage": usage(wholes)}

    size = sum(whole_reply_size(w) for w in wholes)
    return await json_reply(reply, size, ctx.client.cpu_limiter)


async def _stream(
    choices: Choices, shape: ReplyShape, include_usage: bool, tools: list[ToolCallStream]
) -> AsyncIterator[bytes]:
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    finals: list[Chunk] = []
    try:
        if shape.chat:  # the first delta of each choice names the role, as OpenAI's does
            for i in range(len(choices.readers)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""}}
                first.update({"logprobs": None, "finish_reason": None})
                yield sse_event({**shape.envelope(shape.chunk_object, [first]), **usage_field})
        async for i, raw in interleave(choices):
            before = tools[i].count
            chunk, calls = tools[i].chunk(raw)
            if chunk.content or chunk.thinking or chunk.logprobs or calls:
                choice = shape.choice(
                    i,
                    chunk.content,
                    list(chunk.logprobs),
                    None,
                    delta=True,
                    thinking=chunk.thinking,
                    tool_calls=openai_tool_calls(calls, before, delta=True),
                )
                yield sse_event({**shape.envelope(shape.chunk_object, [choice]), **usage_field})
            if chunk.done:
                finals.append(chunk)
                finish = openai_finish(finish_reason(chunk), chunk, tools[i].count > 0)
                choice = shape.choice(i, "", [], finish, delta=True)
                if not shape.chat:
                    choice["logprobs"] = None
                yield sse_event({**shape.envelope(shape.chunk_object, [choice]), **usage_field})
        if include_usage:
            yield sse_event({**shape.envelope(shape.chunk_object, []), "usage": usage(finals)})
        yield sse_event("[DONE]")
    except GenerationError as exc:
        yield sse_event(openai_stream_error(exc, choices.request_id))
    finally:
        choices.close()


def _sse_response(choices: Choices, pieces: AsyncIterator[bytes]) -> Response:
    response = Response(StreamBody(choices, pieces), mimetype="text/event-stream")
    response.timeout = None
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("openai", __name__)

    @bp.post("/v1/chat/completions")
    @endpoint(
        "OpenAI: a chat completion (server-sent events when streaming)",
        body=CHAT,
        parse=_chat_parts,
        media=(JSON, SSE),
        errors=GENERATION,
    )
    async def chat_completions(body: DeclaredBody, parts: ChatParts) -> Response:
        name = ctx.resolve_model(MODEL.read(body))
        messages, tools = parts
        if not messages:
            raise bad_request("'messages' must be a non-empty list")
        logprobs = LOGPROBS.read(body)
        top = TOP_LOGPROBS.read(body)
        if top and not logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs': true")
        offered, forced = chosen_tools(ctx, body, tools)
        shape = RESPONSE_FORMAT.read(body)
        if forced is not None and shape is not None:
            raise bad_request("a forced 'tool_choice' cannot be combined with 'response_format'")
        req = GenerateRequest(
            messages=model_defaults.messages(ctx, messages),
            system=model_defaults.system(ctx, None),
            tools=offered,
            logprobs=logprobs,
            top_logprobs=top,
            options=_options(
                body, (MAX_COMPLETION_TOKENS, MAX_TOKENS), model_defaults.parameters(ctx)
            ),
            separate_thinking=True,
            format=forced or shape,
        )
        return await _respond(ctx, req, ReplyShape(chat=True, name=name, logprobs=logprobs), body)

    @bp.post("/v1/completions")
    @endpoint(
        "OpenAI: a text completion (server-sent events when streaming)",
        body=COMPLETIONS,
        parse=PROMPT.read,
        media=(JSON, SSE),
        errors=GENERATION,
    )
    async def completions(body: DeclaredBody, prompt_or_tokens: Prompt) -> Response:
        name = ctx.resolve_model(MODEL.read(body))
        prompt, tokens = prompt_or_tokens
        check_unsupported(body, N.read(body) or 1)
        top = TEXT_LOGPROBS.read(body)
        echo = echo_text(body, prompt, top is not None)
        req = GenerateRequest(
            prompt=prompt,
            tokens=tokens,
            logprobs=top is not None,
            top_logprobs=top or 0,
            options=_options(body, (MAX_TOKENS,), model_defaults.parameters(ctx)),
            format=RESPONSE_FORMAT.read(body),
        )
        return await _respond(
            ctx, req, ReplyShape(chat=False, name=name, logprobs=top is not None, echo=echo), body
        )

    def model_object(name: str) -> dict[str, Any]:
        try:
            created = int(ctx.model_info().modified_at)
        except UnavailableError:
            created = 0
        return {"id": name, "object": "model", "created": created, "owned_by": "mlxrunner"}

    @bp.get("/v1/models")
    @endpoint("OpenAI: the models this server serves (one)", errors=LOADING)
    async def models() -> Response:
        return jsonify({"object": "list", "data": [model_object(ctx.served_name())]})

    @bp.get("/v1/models/<path:model>")
    @endpoint("OpenAI: one model", errors=UNKNOWN_MODEL + LOADING)
    async def model(model: str) -> Response:
        return jsonify(model_object(ctx.resolve_model(model)))

    return bp
