"""The per-request pipeline: prepare the prompt, then turn engine events into chunks.

``prepare`` validates the options, renders the chat template, tokenizes, and clamps
``num_predict`` to the context; ``Runner.submit`` calls it (on a worker thread) before the
request is queued. ``run`` is the request's task in the tree's pipelines nursery: it reads the
``TokenEvent``s the scheduler routes to it, detokenizes them with the streaming detokenizer,
holds back text that may be the start of a stop string (a stop string is never emitted, not
even in part, whatever the token boundaries), and sends ``Chunk``s, the last with the totals.
A failure is sent as the last item, a ``GenerationError``, and goes no further; a generation
the scheduler ended early (``Dropped``: shutdown, or a stalled reader) sends the text it has,
then a ``GenerationCut``. Each chunk its reader takes is reported (``on_taken``, in tokens), so
the scheduler can pause the sequence while the reader lags.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from actors.messages import (
    Chunk,
    DoneReason,
    GenerateRequest,
    GenerationCut,
    GenerationError,
    GenerationItem,
    Logprob,
)
from actors.scheduler_records import Dropped, EngineFailed, Reply
from runtime.engine.protocol import FinishReason, TokenEvent
from runtime.errors import OptionsError, PromptError, PromptTooLongError
from runtime.text.stops import StopMatcher
from runtime.text.structured import Constraint, compile_format
from runtime.text.thinking import (
    ThinkingSplitter,
    prompt_opens_thinking,
    supports_thinking,
    template_message,
)

if TYPE_CHECKING:
    from runtime.text.tokenizer import Tokenizer

log = logging.getLogger("mlxrunner.pipeline")


@attrs.frozen(kw_only=True)
class Prepared:
    prompt: tuple[int, ...]
    max_tokens: int
    context_length: int
    thinking: bool = False  # split the <think> block out of the content
    opens_thinking: bool = False  # the prompt ends inside <think>: the reply starts in it
    constraint: Constraint | None = None  # the compiled ``request.format``


DEFAULT_CONTEXT = 4096


def check_text_fits(text_chars: int, tokens: int, tokenizer: Tokenizer) -> None:
    """Refuse text that could not fit in ``tokens`` tokens, without tokenizing it.

    No token stands for more than ``tokenizer.max_token_chars`` characters, so longer text
    needs more tokens than that whatever it says (``PromptTooLongError``, HTTP 413).
    """
    limit = tokens * tokenizer.max_token_chars
    if text_chars > limit:
        raise PromptTooLongError(
            f"input of {text_chars} characters cannot fit in {tokens} tokens "
            f"(at most {limit} characters with this model's tokenizer)"
        )


def prepare(request: GenerateRequest, tokenizer: Tokenizer, model_context: int) -> Prepared:
    options = request.options
    # Ollama's default: a request gets DEFAULT_CONTEXT tokens unless it asks for more with
    # num_ctx (up to the server's --ctx), so the KV-cache budget admits sane worst cases.
    context = min(DEFAULT_CONTEXT, model_context)
    if options.num_ctx is not None:
        if options.num_ctx < 1:
            raise OptionsError("num_ctx must be >= 1")
        context = min(options.num_ctx, model_context)
    if request.top_logprobs < 0 or request.top_logprobs > 20:
        raise OptionsError("top_logprobs must be in 0..20")
    if any(not 0 <= t < tokenizer.vocab_size for t, _ in options.logit_bias):
        raise OptionsError(f"logit_bias token ids must be in 0..{tokenizer.vocab_size - 1}")
    given = [x is not None for x in (request.prompt, request.messages, request.tokens)]
    if sum(given) != 1:
        raise OptionsError("give exactly one of prompt, messages or tokens")
    thinking = opens_thinking = False
    can_think = supports_thinking(tokenizer.chat_template)
    if request.think and not can_think:
        raise OptionsError("this model does not support thinking")
    think_flag = request.think
    constraint = None
    if request.format is not None:
        # The grammar holds from the first token, where a thinking model would open <think>.
        if request.think:
            raise OptionsError("'format' (structured output) cannot be combined with thinking")
        think_flag = False if can_think else None
        constraint = compile_format(request.format, tokenizer)
    if request.tokens is not None:
        ids = list(request.tokens)
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise OptionsError(f"token ids must be in 0..{tokenizer.vocab_size - 1}")
    else:
        messages: list[dict[str, object]] = []
        if request.messages is not None:
            messages = [
                template_message({**m.extra, "role": m.role, "content": m.content})
                for m in request.messages
            ]
        elif request.template:
            messages = [{"role": "user", "content": request.prompt or ""}]
        if messages or request.messages is not None:
            if request.system is not None and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": request.system})
            think = {} if think_flag is None else {"enable_thinking": think_flag}
            text = tokenizer.apply_chat_template(messages, tools=request.tools, **think)
            thinking = request.separate_thinking and think_flag is not False and can_think
            opens_thinking = thinking and prompt_opens_thinking(text)
        else:
            text = (request.system or "") + (request.prompt or "")
        check_text_fits(len(text), context, tokenizer)
        ids = tokenizer.encode(text)
    if not ids:
        raise PromptError("empty prompt")
    if len(ids) >= context:
        raise PromptTooLongError.exceeding(len(ids), context)
    room = context - len(ids)
    wanted = options.num_predict
    max_tokens = room if wanted < 0 else min(wanted, room)
    return Prepared(
        prompt=tuple(ids),
        max_tokens=max_tokens,
        context_length=context,
        thinking=thinking,
        opens_thinking=opens_thinking,
        constraint=constraint,
    )


# ``--stream-interval auto``: a chunk gathers one more token per this many running streams.
STREAMS_PER_CHUNK_TOKEN = 16


def chunk_tokens(interval: int | None, running: int) -> int:
    """Tokens a stream's chunk gathers (after its first, which goes at once): ``interval``
    when the server was given one, else one per token up to 16 running streams and one more
    per 16 beyond (4 at 64 streams). Every chunk costs the event loop a response write, and
    the loop shares the GIL with the engine thread: on an H200 with 64 streams, chunks of 1,
    2 and 4 tokens carried 0.78-0.80, 0.88-0.90 and 0.94-1.01 of the engine's rate
    (``bench/gpu_http.py --stream-interval``), while at 16 streams or fewer one token per
    chunk costs nothing measurable. At 64 streams a stream still gets a chunk every ~30 ms."""
    if interval is not None:
        return interval
    return max(1, -(-running // STREAMS_PER_CHUNK_TOKEN))


def _logprob(tokenizer: Tokenizer, event: TokenEvent) -> Logprob | None:
    lp = event.logprob
    if lp is None:
        return None
    return Logprob(
        token=tokenizer.piece(lp.token),
        token_id=lp.token,
        logprob=lp.logprob,
        top=tuple((tokenizer.piece(t), v) for t, v in lp.top),
    )


async def run(
    prepared: Prepared,
    request: GenerateRequest,
    tokenizer: Tokenizer,
    replies: trio.MemoryReceiveChannel[Reply],
    chunks: trio.MemorySendChannel[GenerationItem],
    *,
    submitted_ns: int,
    on_taken: Callable[[int], None],
    gather: Callable[[], int] = lambda: 1,
) -> None:
    """The pipeline task of one request: the scheduler's events in, chunks out.

    ``gather()``: how many tokens a chunk gathers now (``chunk_tokens``); the first token
    always goes at once, so the time to the first token never waits for it.

    The channel ends after the done chunk, or after one ``GenerationError`` when the engine
    failed on the sequence or this code did (a ``GenerationCut`` when the scheduler ended it
    early). Returns quietly once the requester has closed its end.

    Errors: none escape but ``Cancelled``. One request's failure must not reach the nursery
    that every request shares, so even a bug here ends only this request (and is logged with
    its traceback).

    Cancellation: the channel just ends; the requester reads that as cancelled.
    """
    # Plain `with`: closing needs no checkpoint, so a cancellation cannot replace the
    # exception that ends the stream.
    with chunks, replies:
        try:
            await _stream(
                prepared,
                request,
                tokenizer,
                replies,
                chunks,
                submitted_ns,
                on_taken,
                gather,
            )
        except trio.BrokenResourceError:
            pass  # the requester closed its handle
        except Exception as exc:  # see "Errors" above: this request fails, nothing else
            log.exception("a generation's pipeline failed")
            failure = GenerationError("generation failed: internal error")
            failure.__cause__ = exc
            with contextlib.suppress(trio.BrokenResourceError):
                await chunks.send(failure)


async def _stream(
    prepared: Prepared,
    request: GenerateRequest,
    tokenizer: Tokenizer,
    replies: trio.MemoryReceiveChannel[Reply],
    chunks: trio.MemorySendChannel[GenerationItem],
    submitted_ns: int,
    on_taken: Callable[[int], None],
    gather: Callable[[], int],
) -> None:
    detok = tokenizer.detokenizer(prepared.prompt[-4:])
    stops = StopMatcher(request.options.stop)
    splitter = ThinkingSplitter(inside=prepared.opens_thinking) if prepared.thinking else None
    eos = tokenizer.eos_ids
    first_token_ns: int | None = None
    eval_count = 0
    reason = DoneReason.STOP
    hit_stop = False
    cut: Dropped | None = None
    pending_ids: list[int] = []
    pending_lps: list[Logprob] = []
    pending_text: list[str] = []
    pending_thinking: list[str] = []
    reported = 0  # leading tokens of ``pending_ids`` already reported taken
    sent = False  # a chunk with text went out (the first one is never held for ``gather``)

    def split(text: str) -> tuple[str, str]:
        """(thinking, content) of newly detokenized text; stop strings see only the content."""
        if splitter is None:
            return "", text
        return splitter.feed(text)

    async def emit(text: str, thought: str = "") -> None:
        """Send the text so far; while the reader lags and more events wait, hold it for one
        chunk with them (a chunk per token per stream costs the HTTP layer a socket write
        each: at 64 streams that capped throughput, bench/gpu_http.py)."""
        nonlocal pending_ids, pending_lps, reported, sent
        if text:
            pending_text.append(text)
        if thought:
            pending_thinking.append(thought)
        if not pending_text and not pending_thinking:
            # Held for a stop string or a partial character, not for the reader: not unread
            # (or a sequence could pause waiting for a reader that waits for it).
            on_taken(len(pending_ids) - reported)
            reported = len(pending_ids)
            return
        if sent and len(pending_ids) < gather():
            # ``--stream-interval``: fewer, larger chunks (the done chunk takes the rest). Held
            # here, not by the reader: taken, so the sequence never pauses for it.
            on_taken(len(pending_ids) - reported)
            reported = len(pending_ids)
            return
        chunk = Chunk(
            content="".join(pending_text),
            thinking="".join(pending_thinking),
            tokens=tuple(pending_ids),
            logprobs=tuple(pending_lps),
        )
        try:
            chunks.send_nowait(chunk)
        except trio.WouldBlock:
            if replies.statistics().current_buffer_used > 0:
                return  # the reader is busy and another token is here: send them together
            await chunks.send(chunk)
        on_taken(len(chunk.tokens) - reported)
        reported = 0
        sent = True
        pending_text.clear()
        pending_thinking.clear()
        pending_ids, pending_lps = [], []

    async for item in replies:
        if isinstance(item, EngineFailed):
            await chunks.send(item.generation_error())
            return
        if isinstance(item, Dropped):
            cut = item
            break
        if item.token is None:
            continue
        if first_token_ns is None:
            first_token_ns = time.monotonic_ns()
        if item.finish is FinishReason.STOP and item.token in eos:
            reason = DoneReason.STOP
            break
        eval_count += 1
        pending_ids.append(item.token)
        lp = _logprob(tokenizer, item)
        if lp is not None:
            pending_lps.append(lp)
        thought, text = split(detok.add(item.token))
        text, hit_stop = stops.feed(text)
        await emit(text, thought)
        if hit_stop:
            reason = DoneReason.STOP
            break
        if item.finish is not None:
            reason = DoneReason.LENGTH if item.finish is FinishReason.LENGTH else DoneReason.STOP
            break
    else:
        cut = Dropped("the generation was cancelled")  # its channel closed without a marker
    if cut is None and not hit_stop:
        # Text held for a stop string that never completed, or a last partial character.
        thought, text = split(detok.finish())
        if splitter is not None:
            more_thought, more_text = splitter.finish()
            thought, text = thought + more_thought, text + more_text
        text, hit_stop = stops.feed(text)
        await emit(text if hit_stop else text + stops.flush(), thought)
    now = time.monotonic_ns()
    first = first_token_ns or now
    final = Chunk(
        content="".join(pending_text),  # text held back for a lagging reader, if any
        thinking="".join(pending_thinking),
        tokens=tuple(pending_ids),
        logprobs=tuple(pending_lps),
        done=True,
        done_reason=reason if cut is None else DoneReason.CANCELLED,
        prompt_eval_count=len(prepared.prompt),
        prompt_eval_duration=first - submitted_ns,
        eval_count=eval_count,
        eval_duration=now - first,
        total_duration=now - submitted_ns,
    )
    if cut is None:
        await chunks.send(final)
        return
    # Cut short: the text so far goes out as usual (held stop-string prefixes excepted), then
    # an error that no reader can mistake for a finished generation.
    if final.content or final.thinking or final.tokens:
        await chunks.send(attrs.evolve(final, done=False, done_reason=None))
    what = (
        f"the generation was cut short after {eval_count} tokens"
        if cut.admitted
        else "the request was never started"
    )
    message = f"{cut.reason}: {what}"
    await chunks.send(
        GenerationCut(message, attrs.evolve(final, content="", thinking="", tokens=(), logprobs=()))
    )
