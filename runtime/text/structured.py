"""Structured output: what a request's reply must be (``OutputFormat``), compiled against a
model's tokenizer into a ``Constraint`` that the engine's sampler follows token by token.

The grammar library is llguidance (the one llama.cpp and vLLM use): it compiles a JSON schema to
a grammar, and a matcher per sequence computes the set of tokens that keep the output inside it
as a bitmask over the vocabulary (~0.1-0.2 ms a token on a 49k vocabulary), with numpy only, so
it runs on any MLX backend. Whitespace between JSON tokens is bounded (``WHITESPACE``): an
unbounded run is valid JSON that a small model can fall into until its length limit.

A ``Constraint`` is compiled once per request (on a worker thread, where the prompt is
tokenized); each sequence of the request starts its own matcher from it (``start``).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
import llguidance

from runtime.errors import OptionsError

if TYPE_CHECKING:
    from runtime.text.tokenizer import Tokenizer

# Between JSON tokens: up to one newline and an indentation, or a few spaces.
WHITESPACE = r"(\n[ \t]{0,20}|[ ]{0,4})"

# What "any JSON" means for Ollama's "json" and OpenAI's json_object: an object.
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


@attrs.frozen(kw_only=True)
class OutputFormat:
    """What the reply must be: JSON text matching a JSON schema (``kind`` "json_schema",
    ``source`` the schema as JSON text, so the record is hashable), or text of a Lark grammar
    in llguidance's dialect, which may embed JSON schemas (``kind`` "lark").

    ``strict``: a schema keyword the grammar cannot enforce is an error (else it is ignored;
    OpenAI's ``strict: false``).
    """

    kind: Literal["json_schema", "lark"] = "json_schema"
    source: str
    strict: bool = True

    @classmethod
    def json_object(cls) -> OutputFormat:
        return cls(source=json.dumps(ANY_OBJECT))

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], *, strict: bool = True) -> OutputFormat:
        # Key order is kept: object properties are generated in the schema's order.
        return cls(source=json.dumps(closed_objects(schema)), strict=strict)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its
    ``properties`` and says nothing of others: the reply has the listed keys only, as Ollama's
    (llama.cpp's) grammars do, rather than whatever keys a model invents after them."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = closed_objects(out[key])
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


@attrs.frozen(kw_only=True, eq=False)
class Constraint:
    """A compiled ``OutputFormat`` for one model's tokenizer: each ``start`` is a fresh matcher
    (llguidance's ``LLMatcher``) for one sequence, in the grammar's initial state."""

    matcher: llguidance.LLMatcher
    vocab_size: int  # the width of the matcher's masks (the tokenizer's vocabulary)
    eos_ids: frozenset[int]

    def start(self) -> llguidance.LLMatcher:
        return self.matcher.deep_copy()


_WHAT = {"json_schema": "JSON schema", "lark": "grammar (a tool's parameters schema?)"}


def compile_format(fmt: OutputFormat, tokenizer: Tokenizer) -> Constraint:
    """Compile ``fmt`` for ``tokenizer`` (CPU work: call it off the event loop).

    Errors:
        OptionsError: the schema is not a valid JSON schema, or (``strict``) uses a keyword
            the grammar cannot enforce; the message says which.
    """
    if fmt.kind == "lark":
        grammar = llguidance.LLMatcher.grammar_from_lark(fmt.source)
    else:
        options: dict[str, Any] = {"whitespace_pattern": WHITESPACE}
        if not fmt.strict:
            options["lenient"] = True
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                fmt.source,
                overrides=options,  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise OptionsError(f"invalid JSON schema: {exc}") from None
    vocabulary = grammar_tokenizer(tokenizer)
    error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary)
    if error:
        raise OptionsError(f"invalid {_WHAT[fmt.kind]}: {error.strip()}")
    matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
    if matcher.is_error():
        raise OptionsError(f"invalid {_WHAT[fmt.kind]}: {matcher.get_error()}")
    return Constraint(matcher=matcher, vocab_size=vocabulary.vocab_size, eos_ids=tokenizer.eos_ids)


_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)
_building = threading.Lock()


def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (every token's bytes; its end-of-sequence ids), built
    on first use (~0.5 s for a 49k vocabulary) and kept as long as the tokenizer lives."""
    with _building:
        found = _tokenizers.get(tokenizer)
        if found is None:
            found = llguidance.LLTokenizer(
                tokenizer.to_json(),
                n_vocab=tokenizer.vocab_size,
                eos_token=sorted(tokenizer.eos_ids) or None,
            )
            _tokenizers[tokenizer] = found
        return found


def tool_call_format(
    tools: Sequence[Mapping[str, Any]], *, style: Literal["qwen", "llama"]
) -> OutputFormat:
    """The reply is one call of one of ``tools`` (OpenAI's ``{"type": "function", "function":
    {"name", "parameters"}}``) in the model's own call format (``runtime.text.tool_calls``):
    Qwen's ``<tool_call>`` block around ``{"name", "arguments"}``, or Llama's bare
    ``{"name", "parameters"}``. Arguments keep to each tool's parameters schema where the
    grammar can enforce it (the rest of it is ignored, as OpenAI's non-strict tools are)."""
    key = "arguments" if style == "qwen" else "parameters"
    calls = []
    for tool in tools:
        function = tool.get("function", tool)
        parameters = function.get("parameters") or {"type": "object"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.get("name")}, key: parameters},
                "required": ["name", key],
            }
        )
    schema = closed_objects({"anyOf": calls})
    if style == "llama":
        return OutputFormat(source=json.dumps(schema), strict=False)
    schema["x-guidance"] = {"lenient": True, "whitespace_pattern": WHITESPACE}
    call = json.dumps(schema)
    return OutputFormat(
        kind="lark", source=f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {call}\n'
    )
