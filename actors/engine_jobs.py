"""What the scheduler runs on the engine thread: one job and what came of it.

A job (``runtime.scheduling.policy.Job``) applies the policy's decisions to the engine in
order (departures, saving their prefixes; prefix drops; pauses and resumes; admissions, each
failing alone), computes at most one embedding chunk, then steps. The scheduler actor
(``actors.scheduler``) awaits the ``JobOutcome`` and reports it back to the policy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from actors.scheduler_records import EmbeddingWork
from runtime.engine.protocol import EngineStats, StepAbort, TokenEvent
from runtime.scheduling.embeddings import EmbedChunk
from runtime.scheduling.policy import Job

if TYPE_CHECKING:
    from runtime.engine.protocol import Engine

Embedded = list[list[float]] | Exception | None


@attrs.frozen
class StepFailure:
    error: Exception
    abort: StepAbort


@attrs.frozen
class JobOutcome:
    kept: list[int]
    rejected: list[tuple[int, BaseException]]
    events: list[TokenEvent]
    stats: EngineStats
    busy: bool  # the engine has more to compute
    steps: int  # steps that succeeded (the events of all but the last were delivered)
    failure: StepFailure | None  # the step that ended the job by raising
    embedded: Embedded = None  # the embedding chunk's vectors, or why it failed


def run_job(
    engine: Engine,
    job: Job,
    chunk: EmbedChunk[EmbeddingWork] | None,
    limit: int,
    *,
    interrupted: threading.Event,
    post: Callable[[list[TokenEvent], EngineStats], None],
) -> JobOutcome:
    """One engine-thread job: leave (saving prefixes), drop entries, join, pause, compute
    an embedding chunk, then step.

    While nothing asks for a new job (a submission, a departure, a finish: ``_interrupt``)
    it keeps stepping, up to ``limit`` steps, and hands each step's events to ``post``
    (which gives them to the loop without waiting for it): a round trip through the loop per step left the device idle
    while the loop wrote 64 streams' responses (py-spy, GPU, 64 streams). A departure
    still takes effect after at most one more step.
    """
    kept = [engine.remove(r.seq_id, save_as=r.save_as) for r in job.removals]
    for entry_id in job.drops:
        engine.drop_prefix(entry_id)
    for seq_id in job.pauses:
        engine.set_paused(seq_id, True)
    for seq_id in job.resumes:
        engine.set_paused(seq_id, False)
    rejected: list[tuple[int, BaseException]] = []
    for request in job.admits:
        try:
            engine.add(request)
        except Exception as exc:  # e.g. PromptError: this request fails, no other
            rejected.append((request.seq_id, exc))
    embedded: Embedded = None
    if chunk is not None:
        work = chunk.key
        try:
            embedded = engine.embed(
                [work.inputs[i] for i in chunk.indices],
                normalize=work.normalize,
                dimensions=work.dimensions,
            )
        except Exception as exc:  # this request fails (``EmbeddingRequests.finish``), no other
            embedded = exc
    events: list[TokenEvent] = []
    steps = 0
    failure = None
    try:
        while engine.has_work() and (steps == 0 or (steps < limit and not interrupted.is_set())):
            if steps:
                post(events, engine.statistics())
            events = engine.step()
            steps += 1
    except Exception as exc:  # the step's sequences fail (see ``_fail_step``), no others
        events, failure = [], StepFailure(error=exc, abort=engine.abort_step())
    return JobOutcome(
        kept=kept,
        rejected=rejected,
        events=events,
        stats=engine.statistics(),
        busy=engine.has_work(),
        steps=steps,
        failure=failure,
        embedded=embedded,
    )


def removals_only(engine: Engine, job: Job) -> list[int]:
    """Only the removals and prefix drops of ``job`` (a stopping tree's last job)."""
    kept = [engine.remove(r.seq_id, save_as=r.save_as) for r in job.removals]
    for entry_id in job.drops:
        engine.drop_prefix(entry_id)
    return kept
