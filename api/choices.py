"""OpenAI's ``n``: the choices of one request as one group of generations.

``open_choices`` admits the ``n`` generations together (all or none: the runner queues them
at once, and they share one computed prompt); ``collect`` reads them concurrently for a whole
reply; ``interleave`` reads them in turn for a stream, each chunk tagged with its choice's
index (the choices step together in the engine, so reading in turn keeps every reader caught
up). Whatever way the group ends, every generation is closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from actors.messages import Chunk, GenerateRequest, GenerationError
from api.context import ApiContext
from api.errors import request_id
from api.generation import GenerationReader

MAX_CHOICES = 16


@attrs.frozen
class Choices:
    readers: tuple[GenerationReader, ...]

    @property
    def request_id(self) -> str:
        return self.readers[0].request_id

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


async def open_choices(ctx: ApiContext, request: GenerateRequest, n: int) -> Choices:
    """Admit ``n`` generations of ``request`` (its request errors raise here)."""
    ctx.check_admitting()
    started_at = trio.current_time()
    generations = await ctx.client.submit_choices(request, n)
    rid = request_id()
    return Choices(
        tuple(
            GenerationReader(ctx.metrics, g, started_at, request_id=rid, counts_prompt=i == 0)
            for i, g in enumerate(generations)
        )
    )


async def collect(choices: Choices) -> list[Chunk]:
    """Each choice's whole generation (see ``GenerationReader.collect``); the first failure
    raises, and the other choices are left."""
    wholes: list[Chunk | None] = [None] * len(choices.readers)
    failures: list[GenerationError] = []

    async def one(i: int, reader: GenerationReader, cancel: trio.CancelScope) -> None:
        try:
            wholes[i] = await reader.collect()
        except GenerationError as exc:
            failures.append(exc)
            cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            for i, reader in enumerate(choices.readers):
                nursery.start_soon(one, i, reader, nursery.cancel_scope)
    finally:
        choices.close()
    if failures:
        raise failures[0]
    return [w for w in wholes if w is not None]


async def interleave(choices: Choices) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every choice in turn until each is done; a failure raises."""
    active: Sequence[int] = range(len(choices.readers))
    while active:
        still = []
        for i in active:
            chunk = await choices.readers[i].__anext__()
            yield i, chunk
            if not chunk.done:
                still.append(i)
        active = still


def usage(finals: Sequence[Chunk]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, the completion tokens of every choice."""
    prompt = finals[0].prompt_eval_count if finals else 0
    completion = sum(c.eval_count for c in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
