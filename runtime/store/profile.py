"""A stored model's profile: the system prompt, chat template, parameters and messages that
Ollama keeps beside the weights as layers of their own.

Media types are Ollama's: ``application/vnd.ollama.image.system`` (plain text),
``.template`` (text), ``.params`` (a JSON object of options, ``stop`` a list) and ``.messages``
(a JSON list of ``{"role", "content"}``). ``/api/create`` writes them
(``runtime.store.editing``); a load reads them (``Store.resolve``), and the server uses them as
the model's defaults: the parameters under every request's options, the system prompt when a
request has none, the messages before a conversation's own.

The template is a Jinja chat template, the language of ``tokenizer_config.json``'s
``chat_template`` that this server renders. Ollama's own template layers are Go templates
(``{{ .Prompt }}``), which this server cannot render: such a layer in a store written by Ollama
is skipped (the tokenizer's template applies), and ``/api/create`` refuses one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from runtime.errors import ModelLoadError, RuntimeInputError

SYSTEM_MEDIA_TYPE = "application/vnd.ollama.image.system"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
MESSAGES_MEDIA_TYPE = "application/vnd.ollama.image.messages"
LICENSE_MEDIA_TYPE = "application/vnd.ollama.image.license"  # kept, never read
PROFILE_MEDIA_TYPES = (
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
)

MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
# A Go template action: "{{ .Field", "{{- if", "{{ range", "{{ end }}" (never valid Jinja).
_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.|(?:range|if|else|end|with|define|block|template)\b(?!\s*[(|.\[]))"
)


class ProfileError(RuntimeInputError):
    """A profile value that cannot be stored: a Go template, a message without a role, ..."""


@attrs.frozen(kw_only=True)
class ModelProfile:
    """What a stored model says beyond its weights; empty for folders and GGUF files."""

    system: str | None = None
    template: str | None = None  # a Jinja chat template, replacing the tokenizer's
    parameters: Mapping[str, Any] = attrs.field(factory=dict)  # Ollama option names
    messages: tuple[Mapping[str, str], ...] = ()

    def is_empty(self) -> bool:
        return self == ModelProfile()


def is_go_template(text: str) -> bool:
    return _GO_ACTION.search(text) is not None


def check_template(text: str) -> str:
    """``text`` if it is a chat template this server can render; ``ProfileError`` if not."""
    from runtime.text.chat_template import TemplateError, check_syntax

    if is_go_template(text):
        raise ProfileError(
            "'template' looks like an Ollama Go template ({{ .Prompt }}); this server renders "
            "Jinja chat templates, as in tokenizer_config.json's chat_template"
        )
    try:
        check_syntax(text)
    except TemplateError as exc:
        raise ProfileError(str(exc)) from None
    return text


def check_messages(raw: Any) -> tuple[dict[str, str], ...]:
    """Messages as Ollama stores them: a list of ``{"role", "content"}`` with known roles."""
    if not isinstance(raw, list | tuple):
        raise ProfileError("'messages' must be a list of {role, content} objects")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise ProfileError(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content", "")
        if role not in MESSAGE_ROLES:
            raise ProfileError(f"messages[{i}]: role must be one of {sorted(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise ProfileError(f"messages[{i}]: content must be a string")
        out.append({"role": str(role), "content": content})
    return tuple(out)


def layer_bytes(media_type: str, value: Any) -> bytes:
    """What Ollama writes in a profile layer of ``media_type`` for ``value``."""
    if media_type in (SYSTEM_MEDIA_TYPE, TEMPLATE_MEDIA_TYPE, LICENSE_MEDIA_TYPE):
        return str(value).encode("utf-8")
    if media_type == MESSAGES_MEDIA_TYPE:
        value = list(value)
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def carried_layers(profile: ModelProfile) -> list[tuple[str, Any]]:
    """(media type, value) of the layers an import from a stored model carries over: its
    system prompt, parameters and messages (its template is in tokenizer_config.json)."""
    out: list[tuple[str, Any]] = []
    if profile.system:
        out.append((SYSTEM_MEDIA_TYPE, profile.system))
    if profile.parameters:
        out.append((PARAMS_MEDIA_TYPE, dict(profile.parameters)))
    if profile.messages:
        out.append((MESSAGES_MEDIA_TYPE, [dict(m) for m in profile.messages]))
    return out


def read_layers(model: str, blobs: Mapping[str, bytes]) -> ModelProfile:
    """The profile from each profile layer's bytes (by media type); ``ModelLoadError`` names
    a layer that cannot be read. A Go template layer is skipped (see the module docstring)."""

    def text(media_type: str) -> str | None:
        data = blobs.get(media_type)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"model {model!r}: its {media_type} layer is not UTF-8") from None

    def decoded(media_type: str) -> Any:
        raw = text(media_type)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"model {model!r}: its {media_type} layer: {exc}") from None

    template = text(TEMPLATE_MEDIA_TYPE)
    if template is not None and (not template.strip() or is_go_template(template)):
        template = None
    parameters = decoded(PARAMS_MEDIA_TYPE)
    if parameters is not None and not isinstance(parameters, dict):
        raise ModelLoadError(f"model {model!r}: its params layer is not a JSON object")
    raw_messages = decoded(MESSAGES_MEDIA_TYPE)
    try:
        messages = () if raw_messages is None else check_messages(raw_messages)
    except ProfileError as exc:
        raise ModelLoadError(f"model {model!r}: its messages layer: {exc}") from None
    return ModelProfile(
        system=text(SYSTEM_MEDIA_TYPE) or None,
        template=template,
        parameters=parameters or {},
        messages=messages,
    )
