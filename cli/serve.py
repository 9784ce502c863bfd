"""``mlxrunner serve``: the actor tree with the HTTP server in its body.

The tree owns the signals (``actors/tree.py``): the first SIGINT/SIGTERM stops admission
(``/health`` and new generations answer 503, queued ones end at once), lets running
generations go on for ``--grace`` seconds, cuts the rest, then fires
``runner.shutdown_trigger``; hypercorn then stops accepting and gives responses a short flush
before it closes them. A second signal cuts every open generation at once and stops the same
way (a third stops without the flush). Cut work ends with 503 or a stream's error record.
Either way the process exits 0; a bad flag, an unreadable ``--api-key-file``, a
model that cannot be loaded or a port that cannot be bound exits 1 with one line on stderr,
and so does an engine that keeps failing (``EngineFaultError``: the scheduler logged that line).

Who may talk to the server (``api/guard.py``) comes from the flags, each falling back to its
environment variable when not given: the API key from ``--api-key`` or ``--api-key-file``,
else ``MLXRUNNER_API_KEY``; extra Host names from ``--allowed-hosts``, else
``MLXRUNNER_ALLOWED_HOSTS``; extra browser origins from ``--origins``, else
``MLXRUNNER_ORIGINS``. The Host check is on while ``--host`` is a loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from api.app import ApiConfig, create_app, hypercorn_config, serve_http
from api.guard import GuardPolicy, binds_to_loopback, split_list
from runtime.errors import RuntimeInputError, exception_leaves

log = logging.getLogger("mlxrunner.serve")

# Once the tree has drained, the seconds responses get to deliver their final chunk.
FLUSH_SECONDS = 2.0

ENV_API_KEY = "MLXRUNNER_API_KEY"
ENV_ALLOWED_HOSTS = "MLXRUNNER_ALLOWED_HOSTS"
ENV_ORIGINS = "MLXRUNNER_ORIGINS"


class SettingError(Exception):
    """A setting that cannot be used (an unreadable key file); the command exits 1."""


def served_name(model: str) -> str:
    """The name clients use: a store name as given; a folder or file path by its stem (the
    full path is accepted too, as the loader reports it)."""
    path = Path(model)
    if model.endswith(".gguf") or "/" in model or path.exists():
        return path.stem if model.endswith(".gguf") else path.name
    return model


def api_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ApiConfig:
    """The HTTP settings from the flags and, where a flag is not given, the environment.

    Raises ``SettingError`` for a key file that cannot be read or holds no key.
    """
    return ApiConfig(
        model_name=served_name(str(args.model)) if getattr(args, "model", None) else "",
        api_key=api_key(args, environ),
        max_body=int(getattr(args, "max_body", 8 * 1024 * 1024)),
        models_dir=getattr(args, "models_dir", None),
        allow_pull=True,
        manage_models=True,
        guard=GuardPolicy(
            check_host=binds_to_loopback(getattr(args, "host", "127.0.0.1")),
            allowed_hosts=split_list(
                _flag_or_env(args, "allowed_hosts", environ, ENV_ALLOWED_HOSTS)
            ),
            allowed_origins=split_list(_flag_or_env(args, "origins", environ, ENV_ORIGINS)),
        ),
    )


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """``--api-key``, else the contents of ``--api-key-file`` (surrounding whitespace
    stripped), else ``$MLXRUNNER_API_KEY``; ``None`` (no key) when none is set."""
    if getattr(args, "api_key", None):
        return str(args.api_key)
    path = getattr(args, "api_key_file", None)
    if path is None:
        return environ.get(ENV_API_KEY) or None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingError(f"--api-key-file: cannot read {path}: {reason}") from None
    if not key:
        raise SettingError(f"--api-key-file: {path} holds no key")
    return key


def _flag_or_env(
    args: argparse.Namespace, flag: str, environ: Mapping[str, str], variable: str
) -> str:
    value = getattr(args, flag, None)
    return str(value) if value is not None else environ.get(variable, "")


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """``actors.config.RunnerConfig`` fields from the command line."""
    options = {
        "model": args.model,
        "models_dir": getattr(args, "models_dir", None),
        "execution": getattr(args, "execution", "auto"),
        "context_length": getattr(args, "ctx", None),
        "parallel": args.parallel,
        "prefill_chunk": getattr(args, "prefill_chunk", 512),
        "max_queue": args.max_queue,
        "max_open": getattr(args, "max_open", 256),
        "stream_interval": getattr(args, "stream_interval", None),
        "cache_gb": args.cache_gb,
        "grace": args.grace,
    }
    if getattr(args, "cpu_workers", None) is not None:
        options["cpu_workers"] = args.cpu_workers
    return options


async def serve(
    args: argparse.Namespace,
    *,
    load: Any = None,
    config: ApiConfig | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the tree (``load`` overrides the model loader, for tests) and serve it with
    ``config`` (default: ``api_config(args)``)."""
    from actors.tree import open_runner

    http = hypercorn_config(args.host, args.port, FLUSH_SECONDS)
    if config is None:
        config = api_config(args)
    async with open_runner(load=load, handle_signals=True, **runner_options(args)) as runner:
        app = create_app(runner, config)

        async def announce(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve_http(
                app, http, shutdown_trigger=runner.shutdown_trigger, task_status=task_status
            )

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(announce)
            for bind in binds:
                print(f"mlxrunner: serving on {bind}", file=sys.stderr, flush=True)
            task_status.started(binds)


def main(args: argparse.Namespace, *, load: Any = None) -> int:
    """``mlxrunner serve``; returns the exit status. ``load`` replaces the model load (tests)."""
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)
    from actors.messages import EngineFaultError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = api_config(args)
    except SettingError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if not config.guard.check_host and not config.api_key:
        log.warning("listening on %s, beyond this machine, without an API key", args.host)
    try:
        trio.run(functools.partial(serve, args, load=load, config=config))
    except Exception as exc:
        # A taken port, an unknown host, a missing model: one line each, not a traceback.
        problems = exception_leaves(exc)
        if any(isinstance(p, EngineFaultError) for p in problems):
            return 1  # its line is in the log already
        if not all(isinstance(p, OSError | RuntimeInputError) for p in problems):
            raise
        for p in problems:
            print(f"Error: {p}", file=sys.stderr)
        return 1
    from actors.tree import engine_thread_alive

    if engine_thread_alive():  # a second signal abandoned a load still running in MLX
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)
    return 0
