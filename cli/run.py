"""``mlxrunner run``: one generation streamed to stdout through the actor tree.

The same actors as ``serve`` (loader, scheduler, pipeline, engine thread), with this command
as the only client. Text goes to stdout as it is produced; the load progress and errors go to
stderr; a prompt of ``-`` is read from stdin. Ctrl-C (or SIGTERM) leaves the generation, which
frees its sequence, ends the line and exits 130; a second signal while the tree is still
closing (a load cannot be interrupted mid-tensor) exits at once. A closed stdout (``| head``)
exits 141, a bad flag 2, a model or request error 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import attrs
import trio

from actors.messages import GenerateRequest, GenerationError, GenerationOptions, RunnerClient
from runtime.engine.options import SamplingOptions
from runtime.errors import OptionsError, RuntimeInputError, exception_leaves
from runtime.progress import ProgressBar

if TYPE_CHECKING:
    from actors.config import LoadFn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # what a shell reports for a Ctrl-C'd command
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # `mlxrunner run ... | head`

# How often the load progress bar is redrawn while the loader works.
_PROGRESS_PERIOD = 0.1


def build_request(args: argparse.Namespace) -> GenerateRequest:
    """The request the flags describe; raises ``OptionsError`` for out-of-range values."""
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
    }
    sampling = SamplingOptions.from_dict({k: v for k, v in given.items() if v is not None})
    num_predict = -1 if args.num_predict is None else args.num_predict
    if num_predict < -1:
        raise OptionsError("--num-predict must be >= 0, or -1 for no limit")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return GenerateRequest(
        prompt=prompt,
        template=bool(args.chat),
        options=GenerationOptions(
            sampling=sampling, num_predict=num_predict, stop=tuple(args.stop or ())
        ),
    )


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """``open_runner`` keyword options from the model flags (shared with ``serve``)."""
    return {
        "model": args.model,
        "models_dir": args.models_dir,
        "execution": getattr(args, "execution", "auto"),
        "context_length": args.ctx,
        "parallel": args.parallel,
        "prefill_chunk": getattr(args, "prefill_chunk", 512),
        "max_queue": 1,  # this command is the only client
    }


@attrs.frozen
class _LoadProgress:
    """The loader reports a fraction only; this is what ``ProgressBar`` draws from it."""

    fraction: float
    phase: str = "load"
    done_bytes: int = 0
    total_bytes: int = 0


@attrs.define
class _Outcome:
    interrupted: bool = False
    broken_pipe: bool = False


async def _wait_until_loaded(
    client: RunnerClient, label: str, err: TextIO, outcome: _Outcome
) -> None:
    """Draw the load progress until the runner is ready (a failed load cancels this)."""
    bar: ProgressBar | None = None
    try:
        while (health := client.health()).status == "loading":
            bar = bar or ProgressBar(label, stream=err)
            bar(_LoadProgress(health.progress))
            await trio.sleep(_PROGRESS_PERIOD)
        if bar is not None:
            bar(_LoadProgress(1.0, phase="ready"))
    finally:
        if bar is not None:
            bar.close()
        if outcome.interrupted and client.health().status == "loading":
            # A load runs to its end on the engine thread; say why nothing happens yet.
            err.write("mlxrunner run: stopping after the load (Ctrl-C again to quit now)\n")
            err.flush()


async def _stream(
    client: RunnerClient, request: GenerateRequest, out: TextIO, outcome: _Outcome
) -> None:
    at_line_start = True
    try:
        with await client.submit(request) as generation:
            async for chunk in generation.chunks:
                if isinstance(chunk, GenerationError):
                    raise chunk
                if chunk.content:
                    out.write(chunk.content)
                    out.flush()
                    at_line_start = chunk.content.endswith("\n")
    except* BrokenPipeError:
        outcome.broken_pipe = True
    finally:
        # Whatever stopped the stream (its end, Ctrl-C, an error), the shell prompt and any
        # error message start on a line of their own.
        if not at_line_start and not outcome.broken_pipe:
            with contextlib.suppress(BrokenPipeError):
                out.write("\n")
                out.flush()


async def _watch_signals(
    signals: AsyncIterator[int], work: trio.CancelScope, outcome: _Outcome, err: TextIO
) -> None:
    async for _ in signals:
        if not outcome.interrupted:
            outcome.interrupted = True
            work.cancel()
            continue
        # The tree is still closing (typically waiting for a load on the engine thread,
        # which cannot stop mid-tensor): a second Ctrl-C means now.
        err.write("mlxrunner run: interrupted\n")
        err.flush()
        os._exit(EXIT_INTERRUPTED)


async def run(
    args: argparse.Namespace,
    request: GenerateRequest,
    *,
    load: LoadFn | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Open the tree, stream one generation to ``out``, return the exit code.

    ``load`` replaces the real model load (``actors.loading.model_loader``) in tests.
    """
    from actors.tree import open_runner

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    outcome = _Outcome()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as work:
                nursery.start_soon(_watch_signals, signals, work, outcome, err)
                async with open_runner(load=load, **runner_options(args)) as client:
                    await _wait_until_loaded(client, f"loading {args.model}", err, outcome)
                    await _stream(client, request, out, outcome)
            nursery.cancel_scope.cancel()
    if outcome.broken_pipe:
        return EXIT_BROKEN_PIPE
    return EXIT_INTERRUPTED if outcome.interrupted else 0


def main(args: argparse.Namespace) -> int:
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)

    try:
        request = build_request(args)  # bad flags fail before a model is loaded
    except OptionsError as exc:
        print(f"mlxrunner run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A model may produce text the terminal's encoding cannot show; never crash on it.
        sys.stdout.reconfigure(errors="replace")
    try:
        code = trio.run(functools.partial(run, args, request))
    except KeyboardInterrupt:  # before or after the signal receiver is in place
        code = EXIT_INTERRUPTED
    except Exception as exc:
        problems = exception_leaves(exc)
        if all(isinstance(p, RuntimeInputError) for p in problems):
            for message in dict.fromkeys(str(p) for p in problems):
                print(f"mlxrunner run: {message}", file=sys.stderr)
        else:
            traceback.print_exception(exc)  # a bug: show all of it
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    # A plain exit: the tree ends its engine thread's MLX streams before joining it
    # (``runtime.engine.lifecycle.end_mlx_thread``), which is what made MLX abort at
    # interpreter exit ("terminate called without an active exception") before.
    logging.shutdown()
    raise SystemExit(code)
