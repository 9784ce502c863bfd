"""``mlxrunner ps``: ask a running server what it has loaded (Ollama's ``GET /api/ps``).

Prints a table: name, id, size, context length and until when the model stays loaded (this
server never unloads: "Forever"). A server that is not running, that wants an API key, or that
answers something else is one line on stderr and exit status 1. Sends ``$MLXRUNNER_API_KEY``
as the bearer key when it is set, as ``serve`` reads it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from cli.store import table
from runtime.progress import human_bytes

ENV_API_KEY = "MLXRUNNER_API_KEY"
TIMEOUT_SECONDS = 10.0
# Ollama's expires_at for a model that never unloads is far in the future.
_FOREVER_AFTER = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


class PsError(Exception):
    """Why the server's list could not be had, in one line for the user."""


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fetch_loaded(url: str, api_key: str | None) -> list[Mapping[str, Any]]:
    """The ``models`` of ``GET {url}/api/ps``; raises ``PsError``."""
    request = urllib.request.Request(f"{url}/api/ps")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise PsError(f"{url} wants an API key: set ${ENV_API_KEY}") from None
        raise PsError(f"{url} answered HTTP {exc.code}: {_error_text(exc)}") from None
    except urllib.error.URLError as exc:
        raise PsError(
            f"could not reach a server at {url} ({_reason(exc.reason)}); is `mlxrunner serve` "
            "running there? (see --host and --port)"
        ) from None
    except (OSError, ValueError) as exc:  # a timeout, a reset, a body that is not JSON
        raise PsError(f"{url} did not answer as mlxrunner does: {exc}") from None
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise PsError(f"{url} did not answer as mlxrunner does: no list of models")
    return models


def _reason(reason: object) -> str:
    return getattr(reason, "strerror", None) or str(reason)


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except (OSError, ValueError):
        return str(exc.reason)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI's shape
        error = error.get("message")
    return str(error or exc.reason)


def _until(expires_at: object, now: dt.datetime) -> str:
    try:
        when = dt.datetime.fromisoformat(str(expires_at))
    except ValueError:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when >= _FOREVER_AFTER:
        return "Forever"
    minutes = max(0, int((when - now).total_seconds() // 60))
    return f"{minutes} minutes from now" if minutes else "less than a minute from now"


def rows(models: Sequence[Mapping[str, Any]], now: dt.datetime) -> list[tuple[str, ...]]:
    """The table ``ps`` prints, its header first."""
    out: list[tuple[str, ...]] = [("NAME", "ID", "SIZE", "CONTEXT", "UNTIL")]
    for model in models:
        size = model.get("size")
        context = model.get("context_length")
        out.append(
            (
                str(model.get("name") or model.get("model") or "?"),
                str(model.get("digest") or "").removeprefix("sha256:")[:12],
                human_bytes(size) if isinstance(size, int) else "",
                str(context) if isinstance(context, int) else "",
                _until(model.get("expires_at"), now),
            )
        )
    return out


def main(args: argparse.Namespace) -> int:
    url = base_url(args.host, args.port)
    try:
        models = fetch_loaded(url, os.environ.get(ENV_API_KEY) or None)
    except PsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(table(rows(models, dt.datetime.now(dt.UTC))))
    return 0
