"""Model names as Ollama writes them: ``[host/][namespace/]name[:tag]``.

A name maps to the manifest path ``manifests/<host>/<namespace>/<name>/<tag>``. Defaults are
Ollama's (host ``registry.ollama.ai``, namespace ``library``, tag ``latest``), so a store written
by Ollama resolves the same short names. Each part is checked against a strict character set
before it ever becomes a path component, which is what keeps ``../../etc`` out of the file system.
"""

from __future__ import annotations

import re

import attrs

from runtime.errors import ModelNotFoundError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's rules (types/model/name.go), slightly stricter: a part starts with a letter or digit,
# so "." and ".." can never be a path component. Hosts may carry a port.
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,349}(:[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")


class InvalidNameError(ModelNotFoundError):
    """A model name that cannot name anything in a store."""


@attrs.frozen
class ModelName:
    host: str
    namespace: str
    name: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse ``[host/][namespace/]name[:tag]``; an invalid name raises ``InvalidNameError``.

        The tag is taken from the last path segment only, so ``host:port/ns/name`` keeps its
        port (Ollama's parser would read ``port/ns/name`` as a tag there).
        """
        if not isinstance(text, str) or not text.strip():
            raise InvalidNameError("invalid model name: empty")
        text = text.strip()
        head, sep, last = text.rpartition("/")
        base, colon, tag = last.partition(":")
        if colon and not tag:
            raise InvalidNameError(f"invalid model name {text!r}: empty tag after ':'")
        parts = [*head.split("/"), base] if sep else [base]
        if len(parts) > 3:
            raise InvalidNameError(
                f"invalid model name {text!r}: expected [host/][namespace/]name[:tag]"
            )
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, base = parts
        elif len(parts) == 2:
            namespace, base = parts
        tag = tag or DEFAULT_TAG
        for label, value, pattern in (
            ("host", host, _HOST),
            ("namespace", namespace, _PART),
            ("name", base, _PART),
            ("tag", tag, _TAG),
        ):
            if not pattern.fullmatch(value):
                raise InvalidNameError(
                    f"invalid model name {text!r}: bad {label} {value!r} (letters, digits, "
                    "'.', '_', '-'; starting with a letter or digit)"
                )
        return cls(host=host, namespace=namespace, name=base, tag=tag)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """Path components below ``manifests/`` (the port's ':' kept, as Ollama does)."""
        return (self.host, self.namespace, self.name, self.tag)

    @property
    def short(self) -> str:
        """The shortest spelling that parses back to this name (``smollm2:135m``)."""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.name}:{self.tag}"

    def __str__(self) -> str:
        return self.short
