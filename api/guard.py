"""Who may talk to the server: the decisions behind the request guard, with no I/O.

``api/app.py`` asks these questions for every request, in this order; each answer is plain
code tested without an event loop (tests/test_guard.py).

- Host (DNS rebinding). While the server listens on a loopback address, only this machine can
  connect, and its clients name the server ``localhost``, a loopback address (127.0.0.0/8,
  ``::1``) or a ``*.localhost`` name. A web page that rebinds its own DNS name to 127.0.0.1
  still sends that name as ``Host``, so any other name is refused (403). Ollama also accepts
  the machine's hostname and ``*.local`` / ``*.internal`` names; those are resolved by DNS or
  mDNS that others on the network may answer, so here they must be allowed by name. A
  request without ``Host`` (HTTP/1.0) does not come from a browser and passes. Listening on
  any other address, the operator chose to expose the server and the check is off.
- Origin (cross-site requests). A browser names the page that sends a request in ``Origin``;
  requests without one are not from a page and pass. Allowed by default: ``http(s)`` pages
  on a local host (any port), and the schemes of local desktop apps (``app``, ``file``,
  ``tauri``, ``vscode-webview``, ``vscode-file``: no web page can claim those). ``null``
  (sandboxed frames, any site can make one) is not allowed unless configured. More origins
  are configured as patterns where ``*`` matches any run of characters; ``*`` alone allows
  every origin.
- The API key: ``Authorization: Bearer KEY``, the scheme in any case, compared in constant
  time.
- A POST body is JSON by content type (``application/json`` or ``*/*+json``): the content
  types a page may send cross-site without a CORS preflight (``text/plain``, forms) are
  refused.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import attrs

# Desktop apps' page schemes (Electron, Tauri, VS Code webviews), as Ollama allows them.
APP_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview", "vscode-file"})
# Methods a preflight may ask for; the routes use GET and POST, the rest answer 405.
CORS_METHODS = "GET, POST, HEAD, OPTIONS"
# Headers a page may read from a cross-origin response beyond the safelisted ones.
CORS_EXPOSED_HEADERS = "Retry-After, X-Request-Id"
CORS_MAX_AGE = 600  # seconds a browser may cache a preflight answer
# Methods whose body must be JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The methods the request counter names; any other counts as "other", so a client that sends
# invented methods cannot add label values to /metrics.
METHOD_LABELS = frozenset({"GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"})

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP token (RFC 9110)
_PORT = re.compile(r"^[0-9]{1,5}$")


def hostname_of(host_header: str) -> str | None:
    """The name or address in a ``Host`` value, lowercased, without port, brackets or a final
    dot; ``None`` when the value is malformed."""
    value = host_header.strip().lower()
    if value.startswith("["):  # [v6]:port or [v6]
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _PORT.match(rest[1:]))):
            return None
        return name if _ip(name) is not None else None
    if value.count(":") > 1:  # a bare IPv6 address: not valid HTTP, but unambiguous
        return value if _ip(value) is not None else None
    name, colon, port = value.partition(":")
    if colon and not _PORT.match(port):
        return None
    name = name.removesuffix(".")
    if not name or not all(part and _label_ok(part) for part in name.split(".")):
        return None
    return name


def is_local_host(name: str) -> bool:
    """``localhost``, a ``*.localhost`` name or a loopback address (``name`` as from
    ``hostname_of``)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    return ip is not None and ip.is_loopback


def binds_to_loopback(
    host: str,
    resolve: Callable[[str], Iterable[str]] | None = None,
) -> bool:
    """Whether listening on ``host`` (as given to ``--host``) takes connections from this
    machine only. A name is resolved (``resolve`` gives its addresses; by default the system
    resolver) and counts as loopback when all its addresses are."""
    name = host.strip().strip("[]").lower()
    if not name:
        return False  # all interfaces
    if _ip(name) is not None or name == "localhost" or name.endswith(".localhost"):
        return is_local_host(name)
    try:
        addresses = list((resolve or _resolve)(name))
    except OSError:
        return False  # the bind fails the same way and says why
    return bool(addresses) and all(is_local_host(a) for a in addresses)


def is_local_origin(origin: str) -> bool:
    """An ``http(s)`` origin on a local host (any port), or a desktop app's scheme."""
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme in APP_SCHEMES:
        return True
    if scheme not in ("http", "https") or parts.path or parts.query or parts.username:
        return False
    name = (parts.hostname or "").removesuffix(".")
    return bool(name) and is_local_host(name)


def is_json_content_type(mimetype: str) -> bool:
    """``application/json`` or a ``+json`` type (``mimetype`` without its parameters)."""
    mimetype = mimetype.strip().lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def body_refusal(method: str, mimetype: str) -> str | None:
    """Why a request's body is refused (its method sends one that is not JSON), or ``None``."""
    if method not in BODY_METHODS or is_json_content_type(mimetype):
        return None
    got = mimetype or "no content type"
    return f"the body must be JSON, sent with 'Content-Type: application/json' (got {got})"


def bearer_token_matches(authorization: str | None, key: str) -> bool:
    """``Authorization: Bearer <key>``, the scheme in any case (RFC 9110 makes auth schemes
    case-insensitive). Compared as digests, in constant time whatever the lengths."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(_digest(given), _digest(key))


def method_label(method: str) -> str:
    """The ``method`` label of the request counter: one of ``METHOD_LABELS`` or ``other``."""
    return method if method in METHOD_LABELS else "other"


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated setting (``--origins``, ``MLXRUNNER_ORIGINS``...) as its items."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


@attrs.frozen(kw_only=True)
class GuardPolicy:
    """The Host and Origin rules of one server (see the module docstring).

    ``check_host`` is on while the server listens on loopback only; ``allowed_hosts`` and
    ``allowed_origins`` are patterns (``*`` matches any run of characters) allowed on top of
    the local ones.
    """

    check_host: bool = True
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def host_refusal(self, host_header: str | None) -> str | None:
        """Why a request with this ``Host`` is refused, or ``None`` when it may pass."""
        if not self.check_host or not (host_header or "").strip():
            return None
        assert host_header is not None
        name = hostname_of(host_header)
        if name is not None and (
            is_local_host(name) or _matches_any(name, self.allowed_hosts, host=True)
        ):
            return None
        return (
            f"host {_quote(host_header)} is not allowed while the server listens on loopback; "
            "allow it with --allowed-hosts or MLXRUNNER_ALLOWED_HOSTS"
        )

    def origin_allowed(self, origin: str) -> bool:
        return is_local_origin(origin) or _matches_any(origin, self.allowed_origins, host=False)

    def origin_refusal(self, origin: str | None) -> str | None:
        """Why a request from this browser ``Origin`` is refused, or ``None``."""
        if origin is None or self.origin_allowed(origin):
            return None
        return (
            f"origin {_quote(origin)} is not allowed; allow it with --origins or MLXRUNNER_ORIGINS"
        )

    @staticmethod
    def preflight_headers(requested_headers: str | None) -> dict[str, str]:
        """The answer to an allowed origin's CORS preflight (with ``response_headers``). The
        headers it asks to send are granted (the origin is trusted); any that is not a valid
        header name is dropped."""
        asked = [h for h in split_list(requested_headers) if _TOKEN.match(h)]
        headers = {"Access-Control-Allow-Methods": CORS_METHODS}
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(asked)
        headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE)
        return headers

    @staticmethod
    def response_headers(origin: str) -> dict[str, str]:
        """The CORS headers of every response to an allowed origin's request."""
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": CORS_EXPOSED_HEADERS,
            "Vary": "Origin",
        }


def _matches_any(value: str, patterns: tuple[str, ...], *, host: bool) -> bool:
    value = value.lower() if host else value.lower().rstrip("/")
    return any(_pattern(p, host).fullmatch(value) for p in patterns)


@functools.cache
def _pattern(pattern: str, host: bool) -> re.Pattern[str]:
    text = pattern.strip().lower()
    if host:  # a name or address as hostname_of gives it: no brackets, port or final dot
        if text.startswith("["):
            text = text[1:].partition("]")[0]
        elif text.count(":") == 1:
            text = text.partition(":")[0]
        text = text.removesuffix(".")
    else:
        text = text.rstrip("/")
    return re.compile(".*".join(re.escape(part) for part in text.split("*")))


def _label_ok(label: str) -> bool:
    # Letters, digits, '-' and '_' (some local names use it); anything else is no host name.
    return all(c.isascii() and (c.isalnum() or c in "-_") for c in label)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _resolve(name: str) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(name, None)]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _quote(value: str) -> str:
    return repr(value if len(value) <= 100 else value[:100] + "...")
