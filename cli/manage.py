"""``mlxrunner cp`` and ``mlxrunner create``: new models in the store from existing ones.

``cp SRC DST`` copies a model's manifest under another name (the blobs are shared, the digest
is the same). ``create NAME --from SRC`` makes NAME from a stored model, a GGUF file or a
model folder, with a system prompt, a chat template (a Jinja file), parameters and messages
stored as Ollama's layers (``runtime.store.profile``): what ``/api/create`` does, without a
server. Exit status 0, or 1 with one ``Error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.store import _fail, _guarded
from runtime.errors import RuntimeInputError
from runtime.store.layout import Store


def cp_main(args: argparse.Namespace) -> int:
    from runtime.store.editing import copy_model

    def run() -> int:
        copied = copy_model(Store.at(args.models_dir), args.source, args.destination)
        print(f"copied '{args.source}' to '{copied.short}'")
        return 0

    return _guarded(run)


def parameters(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as Ollama's options: numbers as numbers, ``stop`` repeatable."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise RuntimeInputError(f"--parameter {pair!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if key == "stop":
            out.setdefault("stop", []).append(text)
        else:
            out[key] = value
    return out


def messages(pairs: list[str]) -> list[dict[str, str]]:
    out = []
    for pair in pairs:
        role, sep, content = pair.partition(":")
        if not sep:
            raise RuntimeInputError(f"--message {pair!r}: expected ROLE:TEXT")
        out.append({"role": role.strip(), "content": content.strip()})
    return out


def _changes(args: argparse.Namespace) -> Any:
    from api.errors import ApiError
    from api.schemas import generation_options
    from runtime.store.editing import ProfileChanges
    from runtime.store.profile import check_messages, check_template

    template = None
    if args.template is not None:
        try:
            template = check_template(Path(args.template).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise RuntimeInputError(f"--template: cannot read {args.template} ({exc})") from None
    params = parameters(args.parameter or [])
    try:
        generation_options(params)  # the checks a request's options get
    except ApiError as exc:
        raise RuntimeInputError(f"--parameter: {exc.message}") from None
    return ProfileChanges(
        system=args.system,
        template=template,
        parameters=params or None,
        messages=check_messages(messages(args.message or [])) or None,
    )


def create_main(args: argparse.Namespace) -> int:
    from runtime.models.source import looks_like_path
    from runtime.store.editing import derive_model

    store = Store.at(args.models_dir)

    def run() -> int:
        changes = _changes(args)
        base = args.source
        if looks_like_path(args.source) or Path(args.source).exists() or args.quantize:
            from runtime.progress import ProgressBar
            from runtime.store.importer import import_model

            bar = ProgressBar(f"importing {args.source}")
            try:
                import_model(
                    args.source, args.name, store=store, quantize=args.quantize, progress=bar
                )
            finally:
                bar.close()
            if changes.is_empty():
                print(f"created {args.name}")
                return 0
            base = args.name
        derive_model(store, args.name, base, changes, lambda _: None)
        print(f"created {args.name} from {args.source}")
        return 0

    try:
        return _guarded(run)
    except KeyboardInterrupt:
        _fail(f"create of {args.name} interrupted")
        return 130
