"""The request fields that ask for structured output, read into ``OutputFormat``.

- Ollama's ``format`` (``/api/generate``, ``/api/chat``, and the native ``/completion``):
  ``"json"`` (any JSON object) or a JSON schema object; ``""`` or null: free text.
- OpenAI's ``response_format`` (both ``/v1`` routes): ``{"type": "text"}``,
  ``{"type": "json_object"}``, or ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}``. Without ``strict: true`` a schema keyword the grammar cannot enforce is
  ignored, as OpenAI's non-strict mode does; otherwise it is a 400.

The shapes are checked here; the schema itself is compiled (and a bad one refused with a 400
that says why) where the prompt is tokenized, off the event loop
(``runtime.text.structured.compile_format``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api import fields
from api.errors import bad_request
from runtime.text.structured import OutputFormat


def _ollama_format(body: Mapping[str, Any], key: str) -> OutputFormat | None:
    value = body.get(key)
    if value in (None, ""):
        return None
    if value == "json":
        return OutputFormat.json_object()
    if isinstance(value, dict):
        return OutputFormat.json_schema(value)
    raise bad_request(f"'{key}' must be \"json\" or a JSON schema object")


FORMAT = fields.field(
    "format",
    {"oneOf": [{"enum": [None, "", "json"]}, {"type": "object"}]},
    _ollama_format,
    description='structured output: "json" (an object) or a JSON schema the reply must match',
)


def _response_format(body: Mapping[str, Any], key: str) -> OutputFormat | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"'{key}' must be an object")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return OutputFormat.json_object()
    if kind != "json_schema":
        raise bad_request(
            f"'{key}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r:.80}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(f"'{key}.json_schema' must be an object with 'name' and 'schema'")
    schema = spec.get("schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"'{key}.json_schema.strict' must be a boolean")
    if schema is None:
        return OutputFormat.json_object()
    if not isinstance(schema, dict):
        raise bad_request(f"'{key}.json_schema.schema' must be a JSON schema object")
    return OutputFormat.json_schema(schema, strict=bool(strict))


RESPONSE_FORMAT = fields.field(
    "response_format",
    {
        "type": ["object", "null"],
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema", None]},
            "json_schema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "schema": {"type": "object"},
                    "strict": {"type": ["boolean", "null"]},
                },
            },
        },
    },
    _response_format,
    description="structured output: json_object, or json_schema (strict: unenforceable "
    "keywords are a 400)",
)
