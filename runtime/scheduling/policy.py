"""The scheduler's decisions: queue, admission against the KV-cache budget, departures, saves.

``SchedulerPolicy`` is plain code: the Trio actor (``actors.scheduler``) asks it for the next
engine ``Job``, runs that job on the engine thread, and reports back (``job_done``) and the
events it routed (``record``). Everything here is tested without an event loop.

Memory is charged as the engine lays it out (``runtime.engine.batch_cache``): a padded batch of
``rows x positions`` that grows and only shrinks when the batch empties, plus the prefix-cache
entries, all against one ``cache_bytes`` budget. A request is admitted only when its *worst
case* fits (prompt + ``max_tokens``, which the pipeline already capped by the context), after
evicting least-recently-used entries if needed; so a running sequence never runs out of cache.
A request that could never fit, even alone in an empty cache, is refused when it is queued.
Admission is first come, first served: the head of the queue waits for room rather than being
overtaken.

Readers: every token routed to a sequence counts as unread until its requester reports it
taken (``consume``). A sequence with ``pause_unread`` tokens unread is paused (the engine stops
decoding it; the others step on) and resumed once its reader is back under ``resume_unread``;
one paused for ``reader_timeout`` seconds is given up (``stalled``), so a client that stops
reading holds a bounded amount of output and, in the end, no cache.

Withdrawn sequences (departed, stalled, finished, shut down) stay in the running map, marked
``ended``, only until the engine has removed them: ``job_done`` forgets them, so ``withdrawn``
is empty whenever the engine has caught up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

import attrs

from runtime.engine.batch_cache import round_up
from runtime.engine.protocol import PrefixReuse, SequenceRequest, TokenEvent
from runtime.errors import PromptTooLongError
from runtime.scheduling.prefix_cache import PrefixIndex

P = TypeVar("P")


class QueueFull(Exception):
    """The bounded queue has no free slot."""


class CacheBudgetError(PromptTooLongError):
    """The request's worst case exceeds the whole KV-cache budget (it could never run)."""


@attrs.frozen(kw_only=True)
class PolicyConfig:
    max_queue: int = 64
    parallel: int = 4
    cache_bytes: int = 2 << 30
    kv_bytes_per_token: int = 1
    prefix_cache: bool = True
    pause_unread: int = 256  # tokens a reader may leave unread before its sequence pauses
    resume_unread: int = 128  # ... and the most it may leave unread for it to go on
    reader_timeout: float = 60.0  # seconds a sequence may stay paused before it is given up

    def __attrs_post_init__(self) -> None:
        if self.max_queue < 1 or self.parallel < 1:
            raise ValueError("max_queue and parallel must be >= 1")
        if self.cache_bytes < 1 or self.kv_bytes_per_token < 1:
            raise ValueError("cache_bytes and kv_bytes_per_token must be >= 1")
        if not 0 <= self.resume_unread < self.pause_unread:
            raise ValueError("need 0 <= resume_unread < pause_unread")
        if not self.reader_timeout >= 0:
            raise ValueError("reader_timeout must be >= 0")


@attrs.frozen(kw_only=True)
class Removal:
    seq_id: int
    save_as: int | None  # prefix-cache entry id to keep its positions under


@attrs.frozen(kw_only=True)
class Job:
    """One engine-thread job: removals, dropped entries, admissions, pauses, then a step."""

    removals: tuple[Removal, ...] = ()
    drops: tuple[int, ...] = ()
    admits: tuple[SequenceRequest, ...] = ()
    pauses: tuple[int, ...] = ()
    resumes: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.removals or self.drops or self.admits or self.pauses or self.resumes)


@attrs.define(eq=False)
class _Running(Generic[P]):
    request: SequenceRequest
    payload: P
    tokens: list[int]  # prompt + every token routed so far (the prefix-cache key)
    produced: bool = False  # a token came back: the prompt was fully computed
    ended: bool = False  # finished or departed: to remove in the next job
    unread: int = 0  # tokens routed that its reader has not taken yet
    paused_at: float | None = None  # when the engine was told to pause it


def worst_case_positions(request: SequenceRequest) -> int:
    # +1: a row that does not decode still takes a dummy write at its length.
    return round_up(len(request.prompt) + request.max_tokens + 1)


class SchedulerPolicy(Generic[P]):
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.prefixes = PrefixIndex(config.kv_bytes_per_token)
        self._queue: deque[tuple[SequenceRequest, P]] = deque()
        self._running: dict[int, _Running[P]] = {}
        self._drops: list[int] = []
        # The engine's batch shape, mirrored: it grows, and resets when the batch empties.
        self._rows = 0
        self._positions = 0

    # ---- the queue ----

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        """Sequences the engine holds: a finished or departed one counts until it is removed,
        so no one sees a sequence gone while its cache is still held."""
        return len(self._running)

    def enqueue(self, request: SequenceRequest, payload: P) -> None:
        """Queue a request; ``QueueFull`` or ``CacheBudgetError`` if it cannot be."""
        self.enqueue_all([(request, payload)])

    def enqueue_all(self, items: Sequence[tuple[SequenceRequest, P]]) -> None:
        """Queue requests together (the choices of one request), all or none: each counts
        against the queue. ``QueueFull`` or ``CacheBudgetError`` if they cannot all be."""
        for request, _ in items:
            need = self._batch_bytes(1, worst_case_positions(request))
            if need > self.config.cache_bytes:
                raise CacheBudgetError(
                    f"the request needs up to {need / 2**20:.0f} MiB of KV cache "
                    f"({len(request.prompt)} prompt + {request.max_tokens} new tokens), more "
                    f"than the whole cache budget ({self.config.cache_bytes / 2**20:.0f} MiB); "
                    "ask for fewer tokens (num_predict / max_tokens) or raise --cache-gb"
                )
        # Requests the next job will admit wait here too: a burst into an idle server may fill
        # every free running slot and then ``max_queue`` more, and only the rest is refused.
        free_slots = max(0, self.config.parallel - len(self._running))
        if len(self._queue) + len(items) > self.config.max_queue + free_slots:
            raise QueueFull
        self._queue.extend(items)

    def withdraw(self, seq_id: int) -> P | None:
        """The requester left. A queued request frees its slot now (its payload is returned);
        a running one is removed in the next job."""
        for i, (request, payload) in enumerate(self._queue):
            if request.seq_id == seq_id:
                del self._queue[i]
                return payload
        running = self._running.get(seq_id)
        if running is not None:
            running.ended = True
        return None

    def withdraw_all(self) -> list[P]:
        """Shutdown: every queued and running request ends; their payloads, queued first."""
        payloads = [payload for _, payload in self._queue]
        self._queue.clear()
        for running in self._running.values():
            if not running.ended:
                running.ended = True
                payloads.append(running.payload)
        return payloads

    def withdraw_queued(self) -> list[P]:
        """Shutdown began: no queued request will be admitted; their payloads, in order."""
        payloads = [payload for _, payload in self._queue]
        self._queue.clear()
        return payloads

    def payload(self, seq_id: int) -> P | None:
        running = self._running.get(seq_id)
        return running.payload if running is not None and not running.ended else None

    @property
    def withdrawn(self) -> frozenset[int]:
        """Sequences that ended but that the engine has not removed yet."""
        return frozenset(seq_id for seq_id, r in self._running.items() if r.ended)

    @property
    def paused(self) -> int:
        return sum(1 for r in self._running.values() if r.paused_at is not None and not r.ended)

    # ---- readers ----

    def consume(self, seq_id: int, tokens: int) -> bool:
        """The requester took ``tokens`` routed tokens; whether a resume is now due."""
        running = self._running.get(seq_id)
        if running is None:
            return False
        running.unread = max(0, running.unread - tokens)
        return self._resume_due(running)

    def stalled(self, now: float) -> list[P]:
        """Sequences paused for ``reader_timeout`` seconds by ``now``: withdrawn (removed in
        the next job); their payloads."""
        payloads = []
        for running in self._running.values():
            since = running.paused_at
            if since is not None and not running.ended and now - since >= self._timeout:
                running.ended = True
                payloads.append(running.payload)
        return payloads

    def next_deadline(self) -> float | None:
        """When the next paused sequence stalls (for the caller's wait), if any is paused."""
        times = [
            r.paused_at + self._timeout
            for r in self._running.values()
            if r.paused_at is not None and not r.ended
        ]
        return min(times, default=None)

    @property
    def _timeout(self) -> float:
        return self.config.reader_timeout

    def _pause_due(self, running: _Running[P]) -> bool:
        return (
            not running.ended
            and running.paused_at is None
            and running.unread >= self.config.pause_unread
        )

    def _resume_due(self, running: _Running[P]) -> bool:
        return (
            not running.ended
            and running.paused_at is not None
            and running.unread <= self.config.resume_unread
        )

    # ---- jobs ----

    def next_job(self, now: float = 0.0) -> Job:
        """What the engine should do before its next step (possibly nothing); ``now`` is the
        caller's clock in seconds (it times pauses)."""
        removals = []
        saving = 0  # bytes of entries this job saves, indexed only when it is done
        for seq_id, running in list(self._running.items()):
            if running.ended:
                save_as = self._save_id(running, saving)
                if save_as is not None:
                    saving += len(running.tokens) * self.config.kv_bytes_per_token
                removals.append(Removal(seq_id=seq_id, save_as=save_as))
        admits = self._admit(leaving=len(removals), saving=saving)
        drops, self._drops = tuple(self._drops), []
        pauses, resumes = [], []
        for seq_id, running in self._running.items():
            if self._pause_due(running):
                running.paused_at = now
                pauses.append(seq_id)
            elif self._resume_due(running):
                running.paused_at = None
                resumes.append(seq_id)
        return Job(
            removals=tuple(removals),
            drops=drops,
            admits=tuple(admits),
            pauses=tuple(pauses),
            resumes=tuple(resumes),
        )

    def job_done(
        self,
        job: Job,
        kept: Sequence[int],
        rejected: Sequence[int] = (),
    ) -> None:
        """The engine ran ``job``: ``kept[i]`` positions were saved for ``job.removals[i]``;
        ``rejected`` admissions were refused by the engine (their requesters are told)."""
        for removal, count in zip(job.removals, kept, strict=True):
            running = self._running.pop(removal.seq_id)
            if removal.save_as is not None and count > 0:
                self._drops.extend(self.prefixes.insert(removal.save_as, running.tokens[:count]))
            elif removal.save_as is not None:
                self._drops.append(removal.save_as)  # nothing kept: nothing to index
        for seq_id in rejected:
            self._running.pop(seq_id, None)
        if not self._running:
            self._rows = self._positions = 0

    def step_failed(self, seq_ids: Sequence[int], lost_entries: Sequence[int] = ()) -> None:
        """An engine step failed: the engine dropped ``seq_ids`` (their requesters are told)
        and lost the prefix entries ``lost_entries``."""
        for seq_id in seq_ids:
            self._running.pop(seq_id, None)
        for entry_id in lost_entries:
            self.prefixes.discard(entry_id)
        if not self._running:
            self._rows = self._positions = 0

    def evict_all(self) -> None:
        """The engine ran out of memory: evict every prefix entry (freed in the next job)."""
        while (evicted := self.prefixes.evict_one()) is not None:
            self._drops.append(evicted)

    def record(self, event: TokenEvent) -> bool:
        """An event was routed: extend the sequence's key (and its unread count); a finish
        ends it. Whether the sequence is now due to pause (its reader lags)."""
        running = self._running.get(event.seq_id)
        if running is None:
            return False
        if event.token is not None:
            running.tokens.append(event.token)
            running.produced = True
            running.unread += 1
        if event.finish is not None:
            running.ended = True
        return self._pause_due(running)

    # ---- decisions ----

    def _batch_bytes(self, rows: int, positions: int) -> int:
        return rows * positions * self.config.kv_bytes_per_token

    def _shape_with(self, request: SequenceRequest, held: int) -> tuple[int, int]:
        return max(self._rows, held + 1), max(self._positions, worst_case_positions(request))

    def _admit(self, *, leaving: int, saving: int) -> list[SequenceRequest]:
        admitted: list[SequenceRequest] = []
        pinned: set[int] = set()
        # Rows of sequences removed in this same job are free again before the admissions.
        held = len(self._running) - leaving
        while self._queue and held < self.config.parallel:
            request, payload = self._queue[0]
            rows, positions = self._shape_with(request, held)
            batch = self._batch_bytes(rows, positions) + saving
            reuse = self.prefixes.lookup(request.prompt) if self.config.prefix_cache else None
            if reuse is not None:
                pinned.add(reuse[0])
            while batch + self.prefixes.nbytes > self.config.cache_bytes:
                evicted = self.prefixes.evict_one(keep=frozenset(pinned))
                if evicted is None:
                    break
                self._drops.append(evicted)
            if batch + self.prefixes.nbytes > self.config.cache_bytes:
                break  # wait for running sequences to finish
            self._queue.popleft()
            if reuse is not None:
                request = attrs.evolve(
                    request, reuse=PrefixReuse(entry_id=reuse[0], length=reuse[1])
                )
            self._rows, self._positions = rows, positions
            self._running[request.seq_id] = _Running(
                request=request, payload=payload, tokens=list(request.prompt)
            )
            admitted.append(request)
            held += 1
        return admitted

    def _save_id(self, running: _Running[P], saving: int) -> int | None:
        """An entry id to keep a leaving sequence's positions under, if they may be kept."""
        if not self.config.prefix_cache or not running.produced:
            return None  # a prefill that never completed is never cached
        size = len(running.tokens) * self.config.kv_bytes_per_token
        # After this job the batch keeps its shape unless it empties; the entry must fit
        # beside it (and beside the other entries this job saves), or older entries make room.
        others = sum(1 for r in self._running.values() if not r.ended)
        batch = self._batch_bytes(self._rows, self._positions) if others else 0
        while batch + self.prefixes.nbytes + saving + size > self.config.cache_bytes:
            evicted = self.prefixes.evict_one()
            if evicted is None:
                return None
            self._drops.append(evicted)
        return self.prefixes.new_id()
