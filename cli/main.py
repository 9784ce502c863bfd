"""The ``mlxrunner`` command line: argument parsing and dispatch, nothing else.

Each command lives in its own module and is imported only when used, so ``mlxrunner list``
does not pay for importing MLX or the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

DEFAULT_MODEL = "smollm2:135m"
DEFAULT_PORT = 11435

# command -> "module:function"; each function takes the parsed namespace and returns an exit code.
_HANDLERS = {
    "serve": "cli.serve:main",
    "run": "cli.run:main",
    "import": "cli.store:import_main",
    "list": "cli.store:list_main",
    "show": "cli.store:show_main",
    "rm": "cli.store:rm_main",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="store name, model folder or .gguf file")
    p.add_argument("--models-dir", default=None, help="store root (default $MLXRUNNER_HOME)")
    p.add_argument(
        "--execution",
        choices=["auto", "dense", "quantized"],
        default="auto",
        help="run quantized weights as stored, or dequantize them (auto: fastest here)",
    )
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--grace", type=float, default=10.0, help="drain seconds on SIGTERM")
    serve.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    serve.add_argument("--cache-gb", type=float, default=2.0, help="KV cache memory bound")
    serve.add_argument("--api-key", default=None, help="require this bearer token")
    serve.add_argument("--max-body", type=int, default=8 * 1024 * 1024, help="bytes per request")

    run = sub.add_parser("run", help="generate once, streamed to stdout")
    _add_model_args(run)
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--top-k", type=int, default=None)
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--min-p", type=float, default=None)
    run.add_argument("--repeat-penalty", type=float, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--num-predict", type=int, default=None)
    run.add_argument("--stop", action="append", default=None)
    run.add_argument("--chat", action="store_true", help="apply the chat template")
    run.add_argument("prompt")

    imp = sub.add_parser("import", help="import a model folder or GGUF file into the store")
    imp.add_argument("source")
    imp.add_argument("name")
    imp.add_argument(
        "--quantize",
        choices=["q4", "q8", "f32"],
        default=None,
        help="re-quantize (q4, q8) or dequantize (f32); default: keep the source encoding",
    )
    imp.add_argument("--group-size", type=int, choices=[32, 64], default=None)
    imp.add_argument("--models-dir", default=None)

    lst = sub.add_parser("list", help="list the store's models")
    lst.add_argument("--models-dir", default=None)

    show = sub.add_parser("show", help="describe one model")
    show.add_argument("name")
    show.add_argument("--models-dir", default=None)

    rm = sub.add_parser("rm", help="remove a model (and blobs no other model uses)")
    rm.add_argument("name")
    rm.add_argument("--models-dir", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = _HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
