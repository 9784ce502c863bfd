"""Request parsing and validation shared by the native, Ollama and OpenAI routes.

Bodies are decoded here (malformed JSON, wrong types and out-of-range values raise a 400
``ApiError`` or ``OptionsError``), options arrive under Ollama's names and become
``GenerationOptions``; the OpenAI routes map their names onto the same fields first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio

from actors.messages import ChatMessage, GenerationOptions
from api.errors import bad_request
from runtime.engine.options import SamplingOptions
from runtime.text.tool_calls import template_fields

_INT_OPTIONS = ("top_k", "repeat_last_n")
# Ollama options with no meaning here (GPU layout, threads, mirostat...) are accepted and
# ignored, as Ollama ignores options it does not know.
INT32_MAX = 2**31 - 1  # counts and lengths beyond this are nonsense and overflow MLX int32s
MAX_TOP_LOGPROBS = 20
INLINE_BODY_BYTES = 64 * 1024  # larger bodies are decoded on a worker thread
T = TypeVar("T")
# OpenAI allows 4 stop strings; these caps are generous and keep the per-token stop check
# (and the request's validation) small.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters
ROLES = {"system", "user", "assistant", "tool"}


def decode_json(data: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else."""
    if not data.strip():
        return {}
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    _check_strings(body)
    return body


def _check_strings(value: Any) -> None:
    """Reject lone surrogates (``"\\ud800"``): no tokenizer or encoder can take them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("request contains an invalid unicode escape") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# ---- typed field access ----


def get_str(body: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string")
    return value


def get_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be a boolean")
    return value


def get_int(
    body: Mapping[str, Any],
    key: str,
    default: int | None = None,
    *,
    lo: int | None = None,
    hi: int | None = None,
) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # Go's JSON numbers are float64: 40.0 is a valid top_k for Ollama
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer")
    if lo is not None and value < lo:
        raise bad_request(f"'{key}' must be >= {lo}")
    if hi is not None and value > hi:
        raise bad_request(f"'{key}' must be <= {hi}")
    return value


def get_float(
    body: Mapping[str, Any],
    key: str,
    default: float | None = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{key}' must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise bad_request(f"'{key}' must be a finite number")
    if lo is not None and value < lo:
        raise bad_request(f"'{key}' must be >= {lo}")
    if hi is not None and value > hi:
        raise bad_request(f"'{key}' must be <= {hi}")
    return value


def get_object(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'{key}' must be an object")
    return value


def get_stop(body: Mapping[str, Any], key: str = "stop") -> tuple[str, ...]:
    """Stop strings: a string or a list of them, at most ``MAX_STOP_STRINGS`` of at most
    ``MAX_STOP_LENGTH`` characters (each generated token is checked against all of them)."""
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
        raise bad_request(f"'{key}' holds {len(value)} strings; at most {MAX_STOP_STRINGS}")
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request(f"'{key}' must be a string or a list of strings")
    if any(len(s) > MAX_STOP_LENGTH for s in value):
        raise bad_request(f"a '{key}' string is longer than {MAX_STOP_LENGTH} characters")
    return tuple(s for s in value if s)


def get_token_ids(body: Mapping[str, Any], key: str) -> list[int] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise bad_request(f"'{key}' must be a list of integers")
    if any(not 0 <= t <= INT32_MAX for t in value):
        raise bad_request(f"'{key}' holds a token id out of range")
    return value


def get_top_logprobs(body: Mapping[str, Any], key: str = "top_logprobs") -> int:
    value = get_int(body, key, 0, lo=0, hi=MAX_TOP_LOGPROBS)
    assert value is not None
    return value


# ---- options ----


def generation_options(
    options: Mapping[str, Any],
    *,
    num_predict: int | None = None,
    stop: tuple[str, ...] = (),
) -> GenerationOptions:
    """``GenerationOptions`` from Ollama-named options; ``num_predict``/``stop`` override."""
    for key in _INT_OPTIONS:  # bounded here; types and ranges are the sampler's to check
        get_int(options, key, hi=INT32_MAX)
    sampling_options = SamplingOptions.from_dict(options)
    if num_predict is None:
        num_predict = get_int(options, "num_predict", hi=INT32_MAX)
    num_ctx = get_int(options, "num_ctx", lo=1, hi=INT32_MAX)
    return GenerationOptions(
        sampling=sampling_options,
        # Ollama: zero or negative means "until the end of sequence or of the context".
        num_predict=num_predict if num_predict is not None and num_predict > 0 else -1,
        stop=stop or get_stop(options),
        num_ctx=num_ctx,
    )


# ---- chat messages ----


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise bad_request(f"{where}: content parts must be objects")
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image_url", "input_image", "image", "input_audio"):
                raise bad_request(f"{where}: this model does not support {kind} input")
            else:
                raise bad_request(f"{where}: unsupported content part {kind!r}")
        return "".join(parts)
    raise bad_request(f"{where}: 'content' must be a string")


def chat_messages(body: Mapping[str, Any], key: str = "messages") -> tuple[ChatMessage, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request(f"'{key}' must be a list of messages")
    messages = []
    for i, raw in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(f"{where} must be an object")
        role = raw.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"{where}: 'role' must be one of {sorted(ROLES)}")
        if raw.get("images"):
            raise bad_request(f"{where}: this model does not support image input")
        extra = {
            k: v for k, v in raw.items() if k not in ("role", "content", "images") and v is not None
        }
        messages.append(
            ChatMessage(
                role=role,
                content=_content_text(raw.get("content"), where),
                extra=template_fields(role, extra),
            )
        )
    return tuple(messages)


def tool_list(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...] | None:
    value = body.get("tools")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise bad_request("'tools' must be a list of objects")
    return tuple(value) or None


async def read_json(request: Any, limiter: trio.CapacityLimiter) -> dict[str, Any]:
    """The request's body as a JSON object (see ``parse_json``)."""
    body, _ = await parse_json(request, limiter, _nothing)
    return body


async def parse_json(
    request: Any, limiter: trio.CapacityLimiter, parse: Callable[[dict[str, Any]], T]
) -> tuple[dict[str, Any], T]:
    """Decode a Quart request's body and ``parse`` it: (the JSON object, what ``parse`` made).

    ``parse`` is the route's plain checking code for the parts of a body that can be as large
    as the body (messages, token ids). A body over ``INLINE_BODY_BYTES`` is decoded, checked
    and parsed on a worker thread behind ``limiter``, so megabytes of JSON never hold the
    event loop; a small one costs less than the trip to a thread and is done here. (413 past
    MAX_CONTENT_LENGTH comes from Quart.)
    """
    data: bytes = await request.get_data(cache=False, as_text=False)
    if len(data) <= INLINE_BODY_BYTES:
        return _decode_and_parse(data, parse)
    return await trio.to_thread.run_sync(_decode_and_parse, data, parse, limiter=limiter)


def _decode_and_parse(
    data: bytes, parse: Callable[[dict[str, Any]], T]
) -> tuple[dict[str, Any], T]:
    body = decode_json(data)
    return body, parse(body)


def _nothing(body: dict[str, Any]) -> None:
    return None


def chat_parts(
    body: Mapping[str, Any],
) -> tuple[tuple[ChatMessage, ...], tuple[Mapping[str, Any], ...] | None]:
    """A chat request's messages and tools (both as long as the body allows)."""
    return chat_messages(body), tool_list(body)
