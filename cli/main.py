"""The ``mlxrunner`` command line: the parser with its help texts, and dispatch.

A command's handler module (``cli.serve``, ``cli.run``, ``cli.store``) is imported only when
that command runs, so ``mlxrunner list`` does not pay for importing MLX or the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn, cast

from cli.numbers import integer, integer_or, number
from cli.store_parsers import (
    add_manage_commands,
    add_ps,
    add_pull,
    add_store_arg,
    add_store_commands,
)
from runtime.engine.options import SamplingOptions

DEFAULT_MODEL = "smollm2:135m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435

# command -> "module:function"; each function takes the parsed namespace and returns an exit code.
_HANDLERS = {
    "serve": "cli.serve:main",
    "run": "cli.run:main",
    "import": "cli.store:import_main",
    "pull": "cli.pull:main",
    "list": "cli.store:list_main",
    "show": "cli.store:show_main",
    "rm": "cli.store:rm_main",
    "ps": "cli.ps:main",
    "cp": "cli.manage:cp_main",
    "create": "cli.manage:create_main",
}


DESCRIPTION = """\
Run large language models with MLX and serve them over HTTP (the native runner API,
Ollama's API and OpenAI's API), from a local model store, an HF/MLX model folder or a
GGUF file."""

EPILOG = f"""\
examples:
  mlxrunner serve                                   serve {DEFAULT_MODEL} on {DEFAULT_HOST}:{DEFAULT_PORT}
  mlxrunner serve --model ./Qwen3-0.6B --port 8080  serve a model folder
  mlxrunner run {DEFAULT_MODEL}                        chat with a model in the terminal
  mlxrunner run {DEFAULT_MODEL} --temperature 0 "The capital of France is"
  mlxrunner pull smollm2:135m
  mlxrunner pull hf.co/mlx-community/Qwen3-0.6B-4bit
  mlxrunner import ./model.gguf mymodel:q4 --quantize q4
  mlxrunner list
  mlxrunner ps                                      what the running server has loaded

Models live in $MLXRUNNER_HOME/models (default ~/.mlxrunner/models), in Ollama's layout.
Run `mlxrunner COMMAND --help` for a command's options."""

RUN_DESCRIPTION = """\
Load MODEL in this process (no server needed), then:
- without PROMPT, on a terminal: chat. The conversation is kept between turns; Ctrl-C
  stops an answer, /bye or Ctrl-D leaves, \"\"\" begins and ends a message of several
  lines, and /? lists the commands (/set parameter, /set system, /clear, /show).
- with PROMPT, or a prompt piped on stdin: stream one answer to stdout (load progress
  and errors go to stderr) and exit. Ctrl-C stops it."""

_FORMATTER = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 1, as every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"Error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        # argparse fills a trailing nargs="*" positional when it meets the first positional
        # word, so the PROMPT of `run MODEL --temperature 0 PROMPT` would be left over.
        trailing = [a for a in self._actions if not a.option_strings and a.nargs == "*"]
        if trailing and extras and all(e == "-" or not e.startswith("-") for e in extras):
            dest = trailing[-1].dest
            setattr(parsed, dest, [*(getattr(parsed, dest, None) or []), *extras])
            extras = []
        return parsed, extras


_MODEL_HELP = "a model in the store (name[:tag]), an HF/MLX model folder or a .gguf file"


def _add_model_args(p: argparse.ArgumentParser, *, model_flag: bool = True) -> None:
    if model_flag:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            metavar="NAME|PATH",
            help=f"{_MODEL_HELP} (default: %(default)s)",
        )
    add_store_arg(p)
    p.add_argument(
        "--execution",
        choices=["auto", "dense", "quantized"],
        default="auto",
        help="run quantized weights packed (quantized) or dequantized to float32 (dense); "
        "auto picks the faster one for this machine (default: %(default)s)",
    )
    p.add_argument(
        "--ctx",
        type=integer(1),
        default=None,
        metavar="N",
        help="the longest context a request may ask for with num_ctx (default: the model's "
        "own); a request that does not ask gets 4096 tokens, as with Ollama",
    )
    p.add_argument(
        "--parallel",
        type=integer(1),
        default=4,
        metavar="N",
        help="how many requests are generated together (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=integer(1),
        default=512,
        metavar="N",
        help="prompt tokens processed per step; smaller keeps other requests flowing during "
        "a long prompt (default: %(default)s)",
    )


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Load a model and serve it over HTTP: the native runner API "
        "(/completion), Ollama's API (/api/...) and OpenAI's API (/v1/...). SIGINT or SIGTERM "
        "stops taking requests, lets running ones finish for --grace seconds, then exits.",
    )
    _add_model_args(serve)
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on; on a loopback address, requests must name a local Host "
        "(see --allowed-hosts), elsewhere the server is exposed (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=integer(0, 65535),
        default=DEFAULT_PORT,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--grace",
        type=number(0),
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long running requests may finish (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=integer(1),
        default=64,
        metavar="N",
        help="requests that may wait for a slot; more get 429 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-open",
        type=integer(1),
        default=256,
        metavar="N",
        help="generations open at once (queued, running, or still being read); more get 503 "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--stream-interval",
        type=integer_or("auto", 1, 64),
        default=None,
        metavar="N|auto",
        help="tokens a streamed response gathers per chunk after its first (default: auto, "
        "each token at once up to 16 running streams, then one more per 16 streams); fewer, "
        "larger chunks lift the throughput of many streams where the event loop is the limit",
    )
    serve.add_argument(
        "--cache-gb",
        type=number(above=0),
        default=2.0,
        metavar="GB",
        help="memory for the requests' KV caches (default: %(default)s)",
    )
    key = serve.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every request but /health (default: "
        "$MLXRUNNER_API_KEY; no key when unset). Other users can see it in the process list: "
        "prefer --api-key-file or the variable",
    )
    key.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the key from this file, surrounding whitespace ignored (instead of --api-key)",
    )
    serve.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="LIST",
        help="while listening on a loopback address, Host names accepted besides localhost, "
        "*.localhost and loopback addresses: comma-separated, '*' matches any run of characters "
        "(default: $MLXRUNNER_ALLOWED_HOSTS)",
    )
    serve.add_argument(
        "--origins",
        default=None,
        metavar="LIST",
        help="browser origins allowed besides local pages and desktop apps: comma-separated, "
        "e.g. 'https://app.example.com,https://*.corp.example'; '*' allows every origin "
        "(default: $MLXRUNNER_ORIGINS)",
    )
    serve.add_argument(
        "--max-body",
        type=integer(1),
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="largest request body accepted; larger ones get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--cpu-workers",
        type=integer(1),
        default=None,
        metavar="N",
        help="worker threads for request-sized CPU work: chat templates, tokenizing, large "
        "JSON bodies; more requests wait for one (default: the CPU count, at most 4)",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="chat with a model, or answer one prompt",
        description=RUN_DESCRIPTION,
        epilog=f"""examples:
  mlxrunner run {DEFAULT_MODEL}
  mlxrunner run {DEFAULT_MODEL} --temperature 0 "The capital of France is"
  mlxrunner run {DEFAULT_MODEL} --chat "Write a haiku about rivers"
  echo "Summarize: ..." | mlxrunner run ./Qwen3-0.6B --chat""",
        formatter_class=_FORMATTER,
    )
    run.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    run.add_argument(
        "prompt",
        nargs="*",
        default=[],  # else argparse counts it as required when MODEL is missing
        metavar="PROMPT",
        help="the prompt (several words are joined with spaces); '-' or none with stdin "
        "piped reads it from stdin; none on a terminal opens a chat",
    )
    _add_model_args(run, model_flag=False)
    defaults = SamplingOptions()
    sampling = run.add_argument_group("sampling")
    sampling.add_argument(
        "--temperature",
        type=number(0),
        default=None,
        metavar="T",
        help=f"0 (or anything below 1e-5) is greedy (default: {defaults.temperature})",
    )
    sampling.add_argument(
        "--top-k",
        type=integer(0),
        default=None,
        metavar="K",
        help=f"sample from the K likeliest tokens; 0 disables (default: {defaults.top_k})",
    )
    sampling.add_argument(
        "--top-p",
        type=number(above=0, hi=1),
        default=None,
        metavar="P",
        help=f"sample from the likeliest tokens holding mass P (default: {defaults.top_p})",
    )
    sampling.add_argument(
        "--min-p",
        type=number(0, 1),
        default=None,
        metavar="P",
        help=f"drop tokens less likely than P times the likeliest one (default: {defaults.min_p})",
    )
    sampling.add_argument(
        "--repeat-penalty",
        type=number(above=0),
        default=None,
        metavar="R",
        help=f"penalty on recently seen tokens; 1 disables (default: {defaults.repeat_penalty})",
    )
    sampling.add_argument(
        "--seed",
        type=integer(),
        default=None,
        help="random seed: the same seed, options and prompt give the same text",
    )
    run.add_argument(
        "--num-predict",
        type=integer(-1),
        default=None,
        metavar="N",
        help="generate at most N tokens (default: until the model stops or the context is full)",
    )
    run.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop before TEXT (repeat for several stop strings)",
    )
    run.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the model's chat template (a chat "
        "session always does)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlxrunner", description=DESCRIPTION, epilog=EPILOG, formatter_class=_FORMATTER
    )
    # The subcommands' parsers are _Parser too (argparse makes them of the parent's class).
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND"),
    )
    _add_serve(sub)
    _add_run(sub)
    add_store_commands(sub)
    add_ps(sub, host=DEFAULT_HOST, port=DEFAULT_PORT)
    add_pull(sub)
    add_manage_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    module_name, func_name = _HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
