"""``mlxrunner serve``: the actor tree with the HTTP server in its body.

The tree owns the signals (``actors/tree.py``): the first SIGINT/SIGTERM stops admission
(``/health`` and new generations answer 503), lets open generations run for ``--grace``
seconds, cancels the rest, then fires ``runner.shutdown_trigger``; hypercorn then stops
accepting and gives responses a short flush before it closes them. A second signal stops at
once. Either way the process exits 0; a bad flag exits 2; a model that cannot be loaded or a
port that cannot be bound exits 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

from api.app import ApiConfig, create_app, hypercorn_config, serve_http
from runtime.errors import RuntimeInputError, exception_leaves

log = logging.getLogger("mlxrunner.serve")

# Once the tree has drained, the seconds responses get to deliver their final chunk.
FLUSH_SECONDS = 2.0


def served_name(model: str) -> str:
    """The name clients use: a store name as given; a folder or file path by its stem (the
    full path is accepted too, as the loader reports it)."""
    path = Path(model)
    if model.endswith(".gguf") or "/" in model or path.exists():
        return path.stem if model.endswith(".gguf") else path.name
    return model


def api_config(args: argparse.Namespace) -> ApiConfig:
    return ApiConfig(
        model_name=served_name(str(args.model)) if getattr(args, "model", None) else "",
        api_key=getattr(args, "api_key", None) or None,
        max_body=int(getattr(args, "max_body", 8 * 1024 * 1024)),
    )


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """``actors.config.RunnerConfig`` fields from the command line."""
    return {
        "model": args.model,
        "models_dir": getattr(args, "models_dir", None),
        "execution": getattr(args, "execution", "auto"),
        "context_length": getattr(args, "ctx", None),
        "parallel": args.parallel,
        "prefill_chunk": getattr(args, "prefill_chunk", 512),
        "max_queue": args.max_queue,
        "cache_gb": args.cache_gb,
        "grace": args.grace,
    }


async def serve(
    args: argparse.Namespace,
    *,
    load: Any = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the tree (``load`` overrides the model loader, for tests) and serve it."""
    from actors.tree import open_runner

    async with open_runner(load=load, handle_signals=True, **runner_options(args)) as runner:
        app = create_app(runner, api_config(args))
        config = hypercorn_config(args.host, args.port, FLUSH_SECONDS)

        async def announce(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve_http(
                app, config, shutdown_trigger=runner.shutdown_trigger, task_status=task_status
            )

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(announce)
            for bind in binds:
                print(f"mlxrunner: serving on {bind}", file=sys.stderr, flush=True)
            task_status.started(binds)


def check_args(args: argparse.Namespace) -> str | None:
    for flag in ("max_queue", "parallel", "max_body", "prefill_chunk"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            return f"--{flag.replace('_', '-')} must be >= 1"
    if args.grace < 0:
        return "--grace must be >= 0"
    if getattr(args, "ctx", None) is not None and args.ctx < 1:
        return "--ctx must be >= 1"
    if args.cache_gb <= 0:
        return "--cache-gb must be > 0"
    if not 0 <= args.port <= 65535:
        return "--port must be in 0..65535"
    return None


def main(args: argparse.Namespace) -> int:
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    problem = check_args(args)
    if problem is not None:
        print(f"mlxrunner serve: {problem}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(serve, args))
    except Exception as exc:
        # A taken port, an unknown host, a missing model: one line each, not a traceback.
        problems = exception_leaves(exc)
        if not all(isinstance(p, OSError | RuntimeInputError) for p in problems):
            raise
        for p in problems:
            print(f"mlxrunner serve: {p}", file=sys.stderr)
        return 1
    from actors.tree import engine_thread_alive

    if engine_thread_alive():  # a second signal abandoned a load still running in MLX
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)
    return 0
