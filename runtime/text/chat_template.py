"""HF-style Jinja chat templates: which one a model's tokenizer config names, and rendering.

``configured_template`` picks the template out of ``tokenizer_config.json``'s
``chat_template`` (a string, or HF's list of named templates). Templates run in Jinja's immutable sandbox with the helpers HF templates expect
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text) and the
whitespace rules transformers uses (``trim_blocks``, ``lstrip_blocks``). A model without a
template gets ChatML, which is what most small instruct models were tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import ModelLoadError, OptionsError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def configured_template(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template ``tokenizer_config`` names: its string, or the ``default`` of HF's
    named templates (``[{"name": ..., "template": ...}]``), as transformers picks it."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"chat_template is a {type(template).__name__}, not a string")
    return template


class TemplateError(OptionsError):
    """The chat template refused the messages or failed to render."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: Jinja's own escapes HTML characters and forces ASCII.
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlocks(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens
    with it (for training masks); rendering just emits the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a plain attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlocks],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"invalid chat template: {exc}") from exc


def check_syntax(source: str) -> None:
    """Raise ``TemplateError`` if ``source`` is not a template Jinja can compile."""
    _compile(source)


def render(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template`` (ChatML when ``None``)."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} has no string 'role'")
    compiled = _compile(template or CHATML)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=list(tools) if tools else None,
            **extra,
        )
    except TemplateError:
        raise
    except RecursionError as exc:
        raise TemplateError("chat template failed: recursion too deep") from exc
    except Exception as exc:  # a template is data: whatever it raises is the request's error
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
