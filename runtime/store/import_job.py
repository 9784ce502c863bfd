"""``python -m runtime.store.import_job``: one import, its progress as JSON lines on stdout.

The server runs the imports of ``/api/create`` (from a GGUF file or a model folder, or with
``quantize``) in a child process of this module rather than in its own: MLX belongs to the
engine thread there, an import needs memory of its own for a while, and a request that goes
away stops the child with SIGINT, on which the importer removes what it wrote.

Each stdout line is one JSON object: ``{"phase", "done_bytes", "total_bytes"}`` while it runs,
then ``{"done": true, "name", "digest"}`` (exit status 0) or ``{"error": "...", "not_found":
bool}`` (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from runtime.errors import ModelNotFoundError, RuntimeInputError
from runtime.progress import Progress


def line(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.store.import_job")
    parser.add_argument("source")
    parser.add_argument("name")
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--quantize", choices=("q4", "q8", "f32"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)
    from runtime.store.importer import import_model
    from runtime.store.layout import Store

    def report(p: Progress) -> None:
        line({"phase": p.phase, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes})

    try:
        result = import_model(
            args.source,
            args.name,
            store=Store(args.models_dir),
            quantize=args.quantize,
            progress=report,
        )
    except RuntimeInputError as exc:
        line({"error": str(exc), "not_found": isinstance(exc, ModelNotFoundError)})
        return 1
    except OSError as exc:  # a full disk, an unreadable file
        line({"error": f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")})
        return 1
    except KeyboardInterrupt:  # the request went away; the importer undid its writes
        return 130
    line({"done": True, "name": result.name, "digest": result.digest})
    return 0


if __name__ == "__main__":
    sys.exit(main())
