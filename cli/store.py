"""``mlxrunner import | list | show | rm``: the store's command line.

Each handler takes the parsed arguments (``cli.main``) and returns an exit code: 0 on success,
1 with ``Error: ...`` on stderr for anything the user can fix (bad name, missing model, damaged
blob, a full disk), 130 when an import is interrupted (it leaves no manifest behind). ``list`` and ``rm``
do not import MLX; ``show`` describes a stored model, a folder or a GGUF file through the same
checks as a load (``runtime.models.description``).
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from runtime.errors import RuntimeInputError
from runtime.progress import ProgressBar, human_bytes
from runtime.store.layout import Store


def _fail(message: str, stream: TextIO | None = None) -> int:
    print(f"Error: {message}", file=stream or sys.stderr)
    return 1


def _guarded(run: Callable[[], int]) -> int:
    try:
        return run()
    except RuntimeInputError as exc:
        return _fail(str(exc))
    except OSError as exc:  # an unwritable store, a full disk
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


def import_main(args: argparse.Namespace) -> int:
    from runtime.store.importer import import_model

    store = Store.at(args.models_dir)
    bar = ProgressBar(f"importing {args.name}")

    def run() -> int:
        started = time.perf_counter()
        try:
            result = import_model(
                args.source,
                args.name,
                store=store,
                quantize=args.quantize,
                group_size=args.group_size,
                progress=bar,
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return _fail(
                f"no space left on the disk of {store.root} ({exc.strerror}); the import of "
                f"{args.name} was undone. Free some space and import again."
            )
        finally:
            bar.close()
        print(
            f"imported {result.name} ({result.parameters:,} parameters, {result.quantization}, "
            f"{human_bytes(result.size_bytes)}; {result.blobs_written} blobs written, "
            f"{result.blobs_reused} reused) in {time.perf_counter() - started:.1f} s"
        )
        return 0

    try:
        return _guarded(run)
    except KeyboardInterrupt:
        print(f"\nimport of {args.name} interrupted; no manifest was written", file=sys.stderr)
        return 130


def _ago(timestamp: float, now: float) -> str:
    seconds = max(0.0, now - timestamp)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "    ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def list_main(args: argparse.Namespace) -> int:
    def run() -> int:
        now = time.time()
        rows = [("NAME", "ID", "SIZE", "QUANTIZATION", "MODIFIED")]
        for entry in Store.at(args.models_dir).list_models():
            rows.append(
                (
                    entry.name,
                    entry.digest.removeprefix("sha256:")[:12],
                    human_bytes(entry.size_bytes),
                    entry.quantization,
                    _ago(entry.modified_at, now),
                )
            )
        print(table(rows))
        return 0

    return _guarded(run)


def show_main(args: argparse.Namespace) -> int:
    from runtime.models.description import describe
    from runtime.store.importer import human_parameters

    def run() -> int:
        info = describe(args.name, store=Store.at(args.models_dir))
        fields = [
            ("architecture", f"{info.model_type} ({info.architecture})"),
            ("parameters", human_parameters(info.parameters)),
            ("context length", str(info.context_length)),
            ("embedding length", str(info.embedding_length)),
            ("quantization", info.quantization),
            ("size", human_bytes(info.size_bytes)),
        ]
        if info.digest:
            fields.append(("digest", info.digest))
        print(f"  Model  {info.name}")
        for label, value in fields:
            print(f"    {label:<20}{value}")
        if info.sampling_defaults:
            print()
            print("  Parameters (generation_config.json)")
            for option, number in info.sampling_defaults.items():
                print(f"    {option:<20}{number:g}")
        print()
        print("  Template")
        template = info.template if info.template is not None else "(none)"
        for line in template.splitlines() or [""]:
            print(f"    {line}")
        return 0

    return _guarded(run)


def rm_main(args: argparse.Namespace) -> int:
    def run() -> int:
        store = Store.at(args.models_dir)
        removed = store.remove(args.name)
        print(f"deleted '{args.name}' ({len(removed)} unused blobs removed)")
        return 0

    return _guarded(run)
