"""``mlxrunner serve``: the actor tree plus the HTTP server, and the signals that stop them.

SIGTERM or SIGINT starts a drain: ``/health`` turns 503 ``shutting_down``, new generations get
503, hypercorn stops accepting connections and lets open responses run for ``--grace``
seconds, then cancels what is left; the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from typing import Any

import trio

from actors.messages import RunnerClient
from api.app import ApiConfig, create_app, hypercorn_config, serve_http
from runtime.errors import RuntimeInputError

log = logging.getLogger("mlxrunner.serve")


async def serve(
    client: RunnerClient,
    config: ApiConfig,
    *,
    host: str,
    port: int,
    grace: float,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``client`` over HTTP until a signal, then drain for ``grace`` seconds."""
    app = create_app(client, config)
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stop.is_set():
                        log.info("%s: draining open requests for up to %.1f s", name, grace)
                        stop.set()
                    else:
                        log.warning("%s again: stopping now", name)
                        nursery.cancel_scope.cancel()

            async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_http(
                    app,
                    hypercorn_config(host, port, grace),
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            nursery.start_soon(watch_signals)
            binds = await nursery.start(run_http)
            for bind in binds:
                print(f"mlxrunner: serving on {bind}", file=sys.stderr, flush=True)
            task_status.started(binds)


def api_config(args: argparse.Namespace) -> ApiConfig:
    return ApiConfig(
        model_name=str(args.model) if getattr(args, "model", None) else "",
        api_key=getattr(args, "api_key", None) or None,
        max_body=int(getattr(args, "max_body", 8 * 1024 * 1024)),
    )


def _check_args(args: argparse.Namespace) -> str | None:
    for flag in ("max_queue", "parallel", "max_body"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            return f"--{flag.replace('_', '-')} must be >= 1"
    if getattr(args, "grace", 0) < 0:
        return "--grace must be >= 0"
    if getattr(args, "ctx", None) is not None and args.ctx < 1:
        return "--ctx must be >= 1"
    if getattr(args, "cache_gb", 1) <= 0:
        return "--cache-gb must be > 0"
    if not 0 <= getattr(args, "port", 0) <= 65535:
        return "--port must be in 0..65535"
    return None


async def _serve_runner(args: argparse.Namespace) -> None:
    from actors.tree import open_runner  # type: ignore[import-not-found,unused-ignore]

    runner_args: dict[str, Any] = {
        "model": args.model,
        "models_dir": args.models_dir,
        "execution": getattr(args, "execution", "auto"),
        "context_length": args.ctx,
        "parallel": args.parallel,
        "prefill_chunk": getattr(args, "prefill_chunk", 512),
        "max_queue": args.max_queue,
        "cache_gb": args.cache_gb,
    }
    async with open_runner(**runner_args) as client:
        await serve(client, api_config(args), host=args.host, port=args.port, grace=args.grace)


def main(args: argparse.Namespace) -> int:
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    problem = _check_args(args)
    if problem is not None:
        print(f"mlxrunner serve: {problem}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(_serve_runner, args))
    except Exception as exc:
        # A taken port, an unknown host, a missing model: one line, not a traceback.
        problems = _leaves(exc)
        if not all(isinstance(p, OSError | RuntimeInputError) for p in problems):
            raise
        for p in problems:
            print(f"mlxrunner serve: {p}", file=sys.stderr)
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
