"""The served model's own defaults applied to a request: a stored model's parameters, system
prompt and messages (``runtime.store.profile``), as Ollama applies a Modelfile's.

The request always wins: its options override the model's parameters one by one, its system
prompt (a ``system`` field or a system message) replaces the model's, and the model's messages
come before the request's own, after the system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from actors.messages import ChatMessage
from api.context import ApiContext
from api.fields import DeclaredBody


def parameters(ctx: ApiContext) -> Mapping[str, Any]:
    return ctx.model_info().profile.parameters


def parameter_lines(parameters: Mapping[str, Any]) -> str:
    """``/api/show``'s ``parameters``: one ``name value`` line per value, as Ollama lists them."""
    out = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            shown = json.dumps(item) if isinstance(item, str) else str(item)
            out.append(f"{key:<30} {shown}")
    return "\n".join(out)


def options(ctx: ApiContext, given: DeclaredBody) -> DeclaredBody:
    """The request's ``options`` over the model's parameters."""
    defaults = parameters(ctx)
    return given.with_defaults(defaults) if defaults else given


def system(ctx: ApiContext, given: str | None) -> str | None:
    return given if given is not None else ctx.model_info().profile.system


def messages(ctx: ApiContext, given: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """The model's messages, then the request's."""
    stored = ctx.model_info().profile.messages
    return tuple(ChatMessage(role=m["role"], content=m["content"]) for m in stored) + given
