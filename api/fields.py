"""Request fields: each pairs a getter of ``api/schemas.py`` with the JSON Schema of what that
getter accepts, so the OpenAPI document (``api/openapi.py``) is built from the very objects the
routes read their bodies with.

A route declares its body as a ``Body`` of fields and reads every value through its field.
The body it is handed is a ``DeclaredBody``: reading a key its ``Body`` does not declare is a
bug (``UndeclaredFieldError``, answered 500 and caught by the fuzzing suite), so no field can
be read without being documented. Schemas use OpenAPI 3.1's dialect (JSON Schema 2020-12);
``null`` is accepted wherever the getter reads it as "not given".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs

from actors.messages import ChatMessage
from api import schemas
from api.schemas import (
    INT32_MAX,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    ROLES,
    get_bool,
    get_float,
    get_int,
    get_object,
    get_stop,
    get_str,
    get_token_ids,
    tool_list,
)
from runtime.engine.options import SamplingOptions

T = TypeVar("T")
Reader = Callable[[Mapping[str, Any], str], T]


class UndeclaredFieldError(Exception):
    """A route read a body key its ``Body`` does not declare (a bug, not a client error)."""


@attrs.frozen
class Field(Generic[T]):
    name: str
    schema: Mapping[str, Any]
    reader: Reader[T] = attrs.field(repr=False)
    required: bool = False
    description: str = ""

    def read(self, body: Mapping[str, Any]) -> T:
        return self.reader(body, self.name)

    def json_schema(self) -> dict[str, Any]:
        out = dict(self.schema)
        if self.description:
            out["description"] = self.description
        return out


class DeclaredBody(Mapping[str, Any]):
    """A decoded request body whose routes may read only the keys of its ``Body``."""

    def __init__(self, data: Mapping[str, Any], names: frozenset[str]) -> None:
        self._data = data
        self._names = names

    def __getitem__(self, key: str) -> Any:
        if key not in self._names:
            raise UndeclaredFieldError(f"read of undeclared request field {key!r}")
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def with_defaults(self, defaults: Mapping[str, Any]) -> DeclaredBody:
        """The same body with ``defaults`` for the keys it does not give."""
        given = {k: v for k, v in self._data.items() if v is not None}
        return DeclaredBody({**defaults, **given}, self._names)


@attrs.frozen
class Body:
    fields: tuple[Field[Any], ...]

    def declare(self, data: Mapping[str, Any]) -> DeclaredBody:
        return DeclaredBody(data, frozenset(f.name for f in self.fields))

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: f.json_schema() for f in self.fields},
        }
        required = [f.name for f in self.fields if f.required]
        if required:
            schema["required"] = required
        return schema  # other keys are ignored, as Ollama and OpenAI ignore them


def body(*fields: Field[Any]) -> Body:
    return Body(fields)


def _nullable(kind: str, **constraints: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **{k: v for k, v in constraints.items() if v is not None}}


# ---- the vocabulary: one constructor per getter ----


def field(name: str, schema: Mapping[str, Any], reader: Reader[T], **kw: Any) -> Field[T]:
    """A field read by a route's own function (``reader(body, name)``)."""
    return Field(name, schema, reader, **kw)


def raw(name: str, schema: Mapping[str, Any], *, description: str = "") -> Field[Any]:
    """A field whose value the route checks itself; ``schema`` says what it accepts."""
    return Field(name, schema, lambda body, key: body.get(key), description=description)


def string(name: str, *, required: bool = False, description: str = "") -> Field[str | None]:
    schema = {"type": "string"} if required else _nullable("string")
    return Field(name, schema, get_str, required, description)


def boolean(name: str, default: bool, *, description: str = "") -> Field[bool]:
    return Field(
        name,
        _nullable("boolean", default=default),
        functools.partial(get_bool, default=default),
        description=description,
    )


def integer(
    name: str,
    default: int | None = None,
    *,
    lo: int | None = None,
    hi: int | None = None,
    description: str = "",
) -> Field[int | None]:
    return Field(
        name,
        _nullable("integer", minimum=lo, maximum=hi, default=default),
        functools.partial(get_int, default=default, lo=lo, hi=hi),
        description=description,
    )


def number(
    name: str, default: float, *, lo: float, hi: float, description: str = ""
) -> Field[float | None]:
    return Field(
        name,
        _nullable("number", minimum=lo, maximum=hi, default=default),
        functools.partial(get_float, default=default, lo=lo, hi=hi),
        description=description,
    )


def obj(
    name: str, properties: Mapping[str, Field[Any]] | None = None, *, description: str = ""
) -> Field[dict[str, Any]]:
    schema = _nullable("object")
    if properties:
        schema["properties"] = {k: f.json_schema() for k, f in properties.items()}
    return Field(name, schema, get_object, description=description)


def top_logprobs(name: str = "top_logprobs") -> Field[int]:
    def read(body: Mapping[str, Any], key: str) -> int:
        return get_int(body, key, 0, lo=0, hi=MAX_TOP_LOGPROBS) or 0

    return Field(name, _nullable("integer", minimum=0, maximum=MAX_TOP_LOGPROBS), read)


TOKEN_IDS_SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
}
STOP_SCHEMA = {
    "type": ["string", "array", "null"],
    "maxLength": MAX_STOP_LENGTH,  # a string's
    "maxItems": MAX_STOP_STRINGS,  # a list's
    "items": {"type": "string", "maxLength": MAX_STOP_LENGTH},
}


def token_ids(name: str, *, required: bool = False) -> Field[list[int] | None]:
    schema = TOKEN_IDS_SCHEMA if required else {**TOKEN_IDS_SCHEMA, "type": ["array", "null"]}
    return Field(name, schema, get_token_ids, required)


def stop(name: str = "stop") -> Field[tuple[str, ...]]:
    return Field(name, STOP_SCHEMA, get_stop, description="stop strings, never streamed out")


_CONTENT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_NULLABLE_STRING = {"type": ["string", "null"]}
# An assistant's earlier call, passed back to the template: OpenAI's arguments are a JSON
# string, Ollama's an object.
_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"type": ["object", "string"]},
            },
        },
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": sorted({*ROLES, "developer"})},
        "content": {"type": ["string", "array", "null"], "items": _CONTENT_PART},
        "tool_calls": {"type": ["array", "null"], "items": _TOOL_CALL},
        "tool_call_id": {**_NULLABLE_STRING, "description": "OpenAI: the call a tool answers"},
        "name": {**_NULLABLE_STRING, "description": "the function a tool message answers"},
        "tool_name": {**_NULLABLE_STRING, "description": "Ollama's name for 'name'"},
    },
}
# A tool the model may call, rendered by the chat template (its `tools` variable).
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "a JSON schema"},
            },
        },
    },
}


def messages(name: str = "messages", *, required: bool = False) -> Field[tuple[ChatMessage, ...]]:
    schema: dict[str, Any] = {"type": "array", "items": _MESSAGE}
    if required:
        schema["minItems"] = 1
    else:
        schema["type"] = ["array", "null"]
    # Looked up on the module at each call, as the schemas' own callers do (tests wrap it).
    return Field(name, schema, lambda body, key: schemas.chat_messages(body, key), required)


def tools(name: str = "tools") -> Field[tuple[Mapping[str, Any], ...] | None]:
    schema = {"type": ["array", "null"], "items": _TOOL}
    return Field(
        name,
        schema,
        lambda body, _key: tool_list(body),
        description="functions the model may call; its calls come back as tool_calls",
    )


# ---- Ollama's options object ----

_JSON_TYPES = {"int": "integer", "float": "number", "int | None": "integer"}
# ``generation_options`` reads these besides the sampling options.
OPTION_FIELDS: dict[str, Field[Any]] = {
    "num_predict": integer("num_predict", hi=INT32_MAX, description="<= 0: until the end"),
    "num_ctx": integer("num_ctx", lo=1, hi=INT32_MAX),
    "stop": stop(),
}


def _sampling_schema(attribute: attrs.Attribute[Any]) -> dict[str, Any]:
    bounds = {"maximum": INT32_MAX} if attribute.name in ("top_k", "repeat_last_n") else {}
    return _nullable(_JSON_TYPES[str(attribute.type)], default=attribute.default, **bounds)


OPTIONS_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "properties": {
        **{a.name: _sampling_schema(a) for a in attrs.fields(SamplingOptions)},
        **{name: f.json_schema() for name, f in OPTION_FIELDS.items()},
    },
    "description": "Ollama's options; others (GPU layout, threads...) are accepted and ignored",
}
OPTION_NAMES = frozenset(OPTIONS_SCHEMA["properties"])


def options(name: str = "options") -> Field[DeclaredBody]:
    """Ollama's ``options``, read as a ``DeclaredBody`` so that every option that
    ``generation_options`` reads is one this schema documents."""

    def read(body: Mapping[str, Any], key: str) -> DeclaredBody:
        return DeclaredBody(get_object(body, key), OPTION_NAMES)

    return Field(name, OPTIONS_SCHEMA, read)


# ---- fields several routes share ----

MODEL = string("model", description="the served model's name; empty or absent means it")
OPTIONS = options()
TOOLS = tools()
LOGPROBS = boolean("logprobs", False)
TOP_LOGPROBS = top_logprobs()
