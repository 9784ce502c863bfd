"""The scheduler's policy and the prefix-cache index, without an event loop or an engine."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine.batch_cache import STEP
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, SequenceRequest, TokenEvent
from runtime.scheduling.policy import (
    CacheBudgetError,
    Job,
    PolicyConfig,
    QueueFull,
    SchedulerPolicy,
)
from runtime.scheduling.prefix_cache import PrefixIndex

BPT = 10  # KV bytes per token


def _req(seq_id: int, prompt: list[int] | tuple[int, ...], max_tokens: int = 8) -> SequenceRequest:
    return SequenceRequest(
        seq_id=seq_id, prompt=tuple(prompt), sampling=SamplingOptions(), max_tokens=max_tokens
    )


def _policy(**kw: float) -> SchedulerPolicy[str]:
    config: dict[str, float] = dict(
        max_queue=8, parallel=4, cache_bytes=4 * STEP * BPT, kv_bytes_per_token=BPT
    )
    config.update(kw)
    return SchedulerPolicy[str](PolicyConfig(**config))  # type: ignore[arg-type]


def _finish(policy: SchedulerPolicy[str], seq_id: int, tokens: list[int]) -> None:
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        policy.record(
            TokenEvent(seq_id=seq_id, token=token, finish=FinishReason.LENGTH if last else None)
        )


def _run_job(
    policy: SchedulerPolicy[str], kept: dict[int, int] | None = None, now: float = 0.0
) -> Job:
    """Plan a job and report it done, the engine keeping ``kept[seq_id]`` positions."""
    job = policy.next_job(now)
    counts = [(kept or {}).get(r.seq_id, 0) if r.save_as is not None else 0 for r in job.removals]
    policy.job_done(job, counts)
    return job


def test_the_queue_is_bounded_and_a_withdrawn_request_frees_its_slot_at_once() -> None:
    policy = _policy(max_queue=2, parallel=1)
    policy.enqueue(_req(9, [1]), "running")
    assert [r.seq_id for r in _run_job(policy).admits] == [9]  # the one slot is taken
    policy.enqueue(_req(1, [1]), "a")
    policy.enqueue(_req(2, [1]), "b")
    with pytest.raises(QueueFull):
        policy.enqueue(_req(3, [1]), "c")
    assert policy.withdraw(2) == "b"
    policy.enqueue(_req(3, [1]), "c")  # the slot is free before any job ran
    assert policy.queued == 2


def test_a_burst_into_an_idle_server_fills_the_free_slots_and_the_queue() -> None:
    """Before the next job admits anything, the requests it will admit wait in the queue
    too: they do not count against ``max_queue``."""
    policy = _policy(max_queue=2, parallel=3)
    for i in range(5):  # 3 free slots + 2 queue places
        policy.enqueue(_req(i, [1]), str(i))
    with pytest.raises(QueueFull):
        policy.enqueue(_req(5, [1]), "5")
    assert [r.seq_id for r in _run_job(policy).admits] == [0, 1, 2]
    assert policy.queued == 2
    with pytest.raises(QueueFull):  # now every slot runs: only the queue's places count
        policy.enqueue(_req(6, [1]), "6")


def test_the_choices_of_one_request_are_queued_all_or_none() -> None:
    policy = _policy(max_queue=2, parallel=2)
    policy.enqueue(_req(0, [1]), "0")
    with pytest.raises(QueueFull):  # 3 free places, 4 choices: none is queued
        policy.enqueue_all([(_req(i, [1]), str(i)) for i in range(1, 5)])
    assert policy.queued == 1
    policy.enqueue_all([(_req(i, [1]), str(i)) for i in range(1, 4)])
    assert policy.queued == 4
    assert [r.seq_id for r in _run_job(policy).admits] == [0, 1]


def test_admission_is_first_come_first_served_up_to_parallel() -> None:
    policy = _policy(parallel=2)
    for i in range(1, 5):
        policy.enqueue(_req(i, [i, i]), str(i))
    assert [r.seq_id for r in _run_job(policy).admits] == [1, 2]
    assert policy.active == 2
    assert _run_job(policy).admits == ()
    _finish(policy, 1, [7])
    job = _run_job(policy)
    assert [r.seq_id for r in job.removals] == [1]
    assert [r.seq_id for r in job.admits] == [3]  # the freed row is reused in the same job


def test_admission_charges_the_worst_case_and_never_overcommits() -> None:
    # Budget: 4 rows of one STEP. A request reserving 2 STEPs widens every row to 2 STEPs.
    policy = _policy(parallel=8)
    policy.enqueue(_req(1, [1] * 10, max_tokens=STEP), "long")  # needs 2 STEPs of positions
    for i in range(2, 6):
        policy.enqueue(_req(i, [1] * 10, max_tokens=4), str(i))
    admitted = [r.seq_id for r in _run_job(policy).admits]
    # rows x positions x BPT <= budget: 2 rows x 2 STEPs fit, a third row would not.
    assert admitted == [1, 2]
    assert policy.queued == 3
    _finish(policy, 1, [5])
    _finish(policy, 2, [5])
    _run_job(policy)  # both leave; the batch empties and its shape resets
    assert [r.seq_id for r in _run_job(policy).admits] == [3, 4, 5]


def test_a_request_that_could_never_fit_is_refused_when_queued() -> None:
    policy = _policy(cache_bytes=STEP * BPT)
    with pytest.raises(CacheBudgetError, match="cache budget"):
        policy.enqueue(_req(1, [1] * 10, max_tokens=STEP), "x")
    assert policy.queued == 0


def test_a_finished_sequence_is_saved_and_its_prefix_reused() -> None:
    policy = _policy()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    policy.enqueue(_req(1, prompt), "a")
    _run_job(policy)
    _finish(policy, 1, [100, 101])
    job = _run_job(policy, kept={1: len(prompt) + 1})
    (removal,) = job.removals
    assert removal.save_as is not None
    assert len(policy.prefixes) == 1
    # The next turn extends the conversation: its prompt reuses every saved position.
    policy.enqueue(_req(2, [*prompt, 100, 42, 43]), "b")
    (admit,) = _run_job(policy).admits
    assert admit.reuse is not None
    assert admit.reuse.length == len(prompt) + 1
    counters = policy.prefixes.counters
    assert (counters.hits, counters.reused_tokens) == (1, len(prompt) + 1)


def test_a_departed_prefill_is_never_saved() -> None:
    policy = _policy()
    policy.enqueue(_req(1, [1, 2, 3]), "a")
    _run_job(policy)
    policy.withdraw(1)  # no token came back: its prompt was never fully computed
    (removal,) = _run_job(policy).removals
    assert removal.save_as is None
    assert len(policy.prefixes) == 0


def test_entries_are_evicted_lru_to_keep_the_byte_budget() -> None:
    budget = 2 * STEP * BPT
    policy = _policy(cache_bytes=budget, parallel=1)
    for seq_id in range(1, 5):
        prompt = [seq_id] * 100
        policy.enqueue(_req(seq_id, prompt), str(seq_id))
        job = _run_job(policy)
        assert [r.seq_id for r in job.admits] == [seq_id]
        _finish(policy, seq_id, [7])
        _run_job(policy, kept={seq_id: 101})
        # Never over budget: saved entries plus the (now empty) batch.
        assert policy.prefixes.nbytes <= budget
    assert policy.prefixes.counters.evictions > 0
    # The newest entries survive.
    assert policy.prefixes.lookup([4] * 100 + [9]) is not None
    assert policy.prefixes.lookup([1] * 100 + [9]) is None


def test_admission_evicts_entries_rather_than_waiting() -> None:
    budget = STEP * BPT
    policy = _policy(cache_bytes=budget, parallel=1)
    policy.enqueue(_req(1, [1] * 60, max_tokens=4), "a")
    _run_job(policy)
    _finish(policy, 1, [7])
    _run_job(policy, kept={1: 61})
    assert len(policy.prefixes) == 1
    # One row of one STEP plus a 61-token entry exceeds the budget: the entry goes.
    policy.enqueue(_req(2, [2] * 60, max_tokens=4), "b")
    job = _run_job(policy)
    assert [r.seq_id for r in job.admits] == [2]
    assert len(policy.prefixes) == 0
    assert len(job.drops) == 1  # the engine frees it before the admission in the same job


def test_inserting_a_longer_key_drops_the_entries_it_extends() -> None:
    index = PrefixIndex(bytes_per_token=1)
    a, b = index.new_id(), index.new_id()
    assert index.insert(a, [1, 2, 3]) == []
    assert index.insert(b, [1, 2, 3, 4, 5]) == [a]
    c = index.new_id()
    assert index.insert(c, [1, 2]) == [c]  # already covered by a longer entry
    assert len(index) == 1
    assert index.lookup([1, 2, 3, 4, 5, 6]) == (b, 5)
    assert index.lookup([1, 2, 3]) == (b, 2)  # one short: the last prompt token is computed
    assert index.lookup([9, 9]) is None


def test_shutdown_withdraws_everything_once() -> None:
    policy = _policy(parallel=1)
    policy.enqueue(_req(1, [1]), "running")
    _run_job(policy)
    policy.enqueue(_req(2, [1]), "queued")
    assert policy.withdraw_all() == ["queued", "running"]
    assert policy.withdraw_all() == []
    assert policy.queued == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["enqueue", "finish", "leave", "job"]),
            st.integers(1, 300),  # prompt length
            st.integers(1, 300),  # max_tokens
            st.integers(0, 7),  # which running sequence
        ),
        max_size=60,
    )
)
def test_admission_never_overcommits_the_budget(actions: list[tuple[str, int, int, int]]) -> None:
    budget = 3 * STEP * BPT + 150 * BPT
    policy = _policy(cache_bytes=budget, parallel=4, max_queue=16)
    next_id = iter(range(1, 10_000))
    running: list[int] = []
    for action, prompt_len, max_tokens, pick in actions:
        if action == "enqueue":
            seq_id = next(next_id)
            with contextlib.suppress(QueueFull, CacheBudgetError):
                policy.enqueue(_req(seq_id, [seq_id % 7] * prompt_len, max_tokens), str(seq_id))
        elif action in ("finish", "leave") and running:
            seq_id = running[pick % len(running)]
            if action == "finish":
                _finish(policy, seq_id, [1, 2])
            else:
                policy.withdraw(seq_id)
        job = policy.next_job()
        # The engine keeps every position it was given (prompt + routed tokens).
        kept = [
            len(policy._running[r.seq_id].tokens) if r.save_as is not None else 0
            for r in job.removals
        ]
        policy.job_done(job, kept)
        assert policy.withdrawn == frozenset()  # the engine removed every ended sequence
        running = [s for s in running if s in policy._running] + [r.seq_id for r in job.admits]
        # What the engine may hold now: the batch at its committed shape plus every entry.
        held = policy._rows * policy._positions * BPT + policy.prefixes.nbytes
        assert held <= budget


def _tokens(policy: SchedulerPolicy[str], seq_id: int, count: int) -> list[bool]:
    """Route ``count`` tokens to ``seq_id``; what ``record`` said about a pause after each."""
    return [policy.record(TokenEvent(seq_id=seq_id, token=7)) for _ in range(count)]


def test_a_lagging_reader_pauses_its_sequence_until_it_catches_up() -> None:
    policy = _policy(pause_unread=4, resume_unread=2)
    policy.enqueue(_req(1, [1], max_tokens=100), "slow")
    policy.enqueue(_req(2, [2], max_tokens=100), "fast")
    _run_job(policy)
    assert _tokens(policy, 1, 4) == [False, False, False, True]  # the 4th unread one: pause
    _tokens(policy, 2, 4)
    policy.consume(2, 4)  # the other reader keeps up
    job = _run_job(policy, now=10.0)
    assert (job.pauses, job.resumes) == ((1,), ())  # only the lagging one, the other runs on
    assert policy.paused == 1
    assert _run_job(policy).pauses == ()  # told once
    assert policy.consume(1, 1) is False  # 3 unread: still too far behind
    assert policy.consume(1, 1) is True  # 2 unread: it may go on
    job = _run_job(policy, now=11.0)
    assert (job.pauses, job.resumes) == ((), (1,))
    assert policy.paused == 0
    assert policy.next_deadline() is None


def test_a_sequence_paused_past_the_reader_timeout_is_given_up_and_removed() -> None:
    policy = _policy(pause_unread=2, resume_unread=0, reader_timeout=60.0)
    policy.enqueue(_req(1, [1], max_tokens=100), "stalled")
    _run_job(policy)
    _tokens(policy, 1, 2)
    _run_job(policy, now=10.0)
    assert policy.next_deadline() == 70.0
    assert policy.stalled(69.9) == []  # still within its bound
    assert policy.stalled(70.0) == ["stalled"]
    assert policy.stalled(80.0) == []  # given up once
    assert policy.withdrawn == {1}
    assert policy.next_deadline() is None
    assert [r.seq_id for r in _run_job(policy).removals] == [1]
    assert policy.withdrawn == frozenset()
    assert policy.active == 0


def test_the_withdrawn_set_empties_after_a_storm_of_cancellations_and_after_shutdown() -> None:
    policy = _policy(parallel=4, max_queue=8, pause_unread=2, resume_unread=1)
    next_id = 1
    live: list[int] = []
    pauses = 0
    for round_ in range(200):
        while policy.queued < 8:
            policy.enqueue(_req(next_id, [next_id % 5 + 1], max_tokens=4), str(next_id))
            next_id += 1
        job = _run_job(policy, now=float(round_))
        pauses += len(job.pauses)
        live = [s for s in live if s in policy._running] + [r.seq_id for r in job.admits]
        for seq_id in live[: round_ % 3]:
            _tokens(policy, seq_id, 2)  # some readers lag: their sequences pause
        leaving = live[round_ % 2 :: 2]
        for seq_id in [*leaving, next_id - 1, 10**6]:  # running, queued, unknown
            policy.withdraw(seq_id)
        policy.stalled(float(round_) - 100)  # none yet: they paused recently
        assert set(leaving) <= policy.withdrawn  # ended ones wait for the engine...
    assert pauses > 0
    policy.stalled(1e9)  # every paused one is given up
    _run_job(policy)
    policy.withdraw_all()  # shutdown
    _run_job(policy)
    assert policy.withdrawn == frozenset()  # ...and are forgotten once it has removed them
    assert policy.active == policy.queued == policy.paused == 0
    assert policy._running == {}


def test_reader_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="resume_unread"):
        PolicyConfig(pause_unread=4, resume_unread=4)
    with pytest.raises(ValueError, match="reader_timeout"):
        PolicyConfig(reader_timeout=float("nan"))
