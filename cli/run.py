"""``mlxrunner run``: one generation, or a chat, streamed to stdout through the actor tree.

The same actors as ``serve`` (loader, scheduler, pipeline, engine thread), with this command
as the only client. With a prompt (or a prompt piped on stdin, or ``-``), text goes to stdout
as it is produced and the load progress and errors go to stderr; Ctrl-C (or SIGTERM) leaves
the generation, which frees its sequence, ends the line and exits 130; a second signal while
the tree is still closing (a load cannot be interrupted mid-tensor) exits at once. A closed
stdout (``| head``) exits 141, a bad flag, a model or a request error 1 with one line on
stderr.

Without a prompt on a terminal it opens a chat (``cli.chat``): once the model is loaded, Ctrl-C
stops the current answer only, and the session ends with ``/bye`` or Ctrl-D (exit 0).
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
from cli.chat import ChatLoop, LineSource, TerminalInput
from cli.chat_session import ChatSession
from runtime.engine.options import SamplingOptions
from runtime.errors import OptionsError, RuntimeInputError, exception_leaves
from runtime.progress import ProgressBar

if TYPE_CHECKING:
    from actors.config import LoadFn

EXIT_ERROR = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT  # what a shell reports for a Ctrl-C'd command
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # `mlxrunner run ... | head`

# How often the load progress bar is redrawn while the loader works.
_PROGRESS_PERIOD = 0.1


def _sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
    }
    return {k: v for k, v in given.items() if v is not None}


def wants_chat(args: argparse.Namespace, stdin: TextIO) -> bool:
    """No prompt given and someone at the terminal: open a chat rather than read stdin."""
    return not args.prompt and stdin.isatty()


def build_session(args: argparse.Namespace) -> ChatSession:
    """The chat the flags set up; raises ``OptionsError`` for out-of-range values."""
    parameters = _sampling_flags(args)
    if args.num_predict is not None:
        parameters["num_predict"] = args.num_predict
    if args.stop:
        parameters["stop"] = list(args.stop)
    return ChatSession(parameters=parameters)


def build_request(args: argparse.Namespace) -> GenerateRequest:
    """The one request the flags describe (the prompt: the words given, or stdin when there are
    none or they are ``-``); raises ``OptionsError`` for out-of-range values."""
    sampling = SamplingOptions.from_dict(_sampling_flags(args))
    num_predict = -1 if args.num_predict is None else args.num_predict
    if num_predict < -1:
        raise OptionsError("--num-predict must be >= 0, or -1 for no limit")
    words = list(args.prompt or ())
    prompt = sys.stdin.read() if words in ([], ["-"]) else " ".join(words)
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
    chat: ChatLoop | None = None  # once a chat runs, Ctrl-C is its to handle


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
    async for signum in signals:
        if signum == signal.SIGINT and outcome.chat is not None:
            outcome.chat.interrupt()
            continue
        if not outcome.interrupted:
            outcome.interrupted = True
            work.cancel()
            continue
        # The tree is still closing (typically waiting for a load on the engine thread,
        # which cannot stop mid-tensor): a second Ctrl-C means now.
        err.write("mlxrunner run: interrupted\n")
        err.flush()
        os._exit(EXIT_INTERRUPTED)


async def _chat(
    client: RunnerClient,
    session: ChatSession,
    source: LineSource | None,
    out: TextIO,
    outcome: _Outcome,
) -> None:
    terminal = None
    if source is None:
        source = terminal = TerminalInput()
    outcome.chat = ChatLoop(client, session, source, out)
    try:
        await outcome.chat.run()
    finally:
        if terminal is not None:
            terminal.restore()


async def run(
    args: argparse.Namespace,
    job: GenerateRequest | ChatSession,
    *,
    load: LoadFn | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    source: LineSource | None = None,
) -> int:
    """Open the tree, stream one generation (or hold a chat) to ``out``, return the exit code.

    ``load`` replaces the real model load (``actors.loading.model_loader``) in tests, and
    ``source`` the terminal a chat reads its lines from.
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
                    if isinstance(job, ChatSession):
                        await _chat(client, job, source, out, outcome)
                    else:
                        await _stream(client, job, out, outcome)
            nursery.cancel_scope.cancel()
    if outcome.broken_pipe:
        return EXIT_BROKEN_PIPE
    return EXIT_INTERRUPTED if outcome.interrupted else 0


def main(args: argparse.Namespace) -> int:
    import runtime  # noqa: F401  (maps the optimized BLAS before anything imports MLX)

    try:  # bad flags fail before a model is loaded
        job = build_session(args) if wants_chat(args, sys.stdin) else build_request(args)
    except OptionsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A model may produce text the terminal's encoding cannot show; never crash on it.
        sys.stdout.reconfigure(errors="replace")
    try:
        code = trio.run(functools.partial(run, args, job))
    except KeyboardInterrupt:  # before or after the signal receiver is in place
        code = EXIT_INTERRUPTED
    except Exception as exc:
        problems = exception_leaves(exc)
        if all(isinstance(p, RuntimeInputError | GenerationError) for p in problems):
            for message in dict.fromkeys(str(p) for p in problems):
                print(f"Error: {message}", file=sys.stderr)
        else:
            traceback.print_exception(exc)  # a bug: show all of it
        code = EXIT_ERROR
    _exit(code)


def _exit(code: int) -> NoReturn:
    # A plain exit: the tree ends its engine thread's MLX streams before joining it
    # (``runtime.engine.lifecycle.end_mlx_thread``), which is what made MLX abort at
    # interpreter exit ("terminate called without an active exception") before.
    logging.shutdown()
    raise SystemExit(code)
