"""The fault rule, the out-of-memory test and what the policy forgets after a failed step:
plain code, no event loop, no engine."""

from __future__ import annotations

import pytest

from actors.messages import GenerationError, OutOfMemoryError
from actors.scheduler_records import EngineFailed
from runtime.engine.batch_cache import STEP
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, SequenceRequest, TokenEvent
from runtime.errors import PromptError
from runtime.scheduling.faults import FaultRule, FaultTracker, is_out_of_memory
from runtime.scheduling.policy import PolicyConfig, SchedulerPolicy
from runtime.testing.faults import out_of_memory

BPT = 10


def _run(tracker: FaultTracker, outcomes: str) -> list[str | None]:
    """Feed ``outcomes`` ("." a good step, "x" a failed one); the verdicts of the failures."""
    verdicts = []
    for outcome in outcomes:
        if outcome == ".":
            tracker.succeeded()
        else:
            verdicts.append(tracker.failed())
    return verdicts


def test_consecutive_failures_stop_the_server_and_a_good_step_resets_the_count() -> None:
    tracker = FaultTracker(FaultRule(consecutive=3, in_window=100, window=1000))
    assert _run(tracker, "xx.xx.") == [None] * 4
    assert _run(tracker, "xx") == [None, None]
    assert tracker.failed() == "3 failed engine steps in a row"


def test_failures_that_keep_flapping_stop_the_server_within_the_window() -> None:
    tracker = FaultTracker(FaultRule(consecutive=3, in_window=3, window=10))
    # Three failures, each followed by a good step: never three in a row.
    verdicts = _run(tracker, "x.x.x")
    assert verdicts[:2] == [None, None]
    assert verdicts[2] == "3 failed engine steps within 10 steps"


def test_failures_older_than_the_window_are_forgotten() -> None:
    tracker = FaultTracker(FaultRule(consecutive=5, in_window=3, window=10))
    # Failed steps 1, 11 and 21: never three within ten steps.
    assert _run(tracker, "x" + "." * 9 + "x" + "." * 9 + "x") == [None, None, None]
    # The window counts steps, not time: eight good steps reported at once count as eight.
    tracker.succeeded(8)
    assert _run(tracker, "x") == [None]  # steps 21 and 30
    assert _run(tracker, "x") == [None]  # step 21 has left the window: 30 and 31
    assert _run(tracker, "x") == ["3 failed engine steps within 10 steps"]
    assert (tracker.steps, tracker.failures) == (32, 6)


def test_the_rule_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        FaultRule(consecutive=0)
    with pytest.raises(ValueError, match="window"):
        FaultRule(in_window=10, window=5)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (out_of_memory(), True),
        (RuntimeError("[malloc] Unable to allocate 1073741824 bytes."), True),
        (RuntimeError("[cuda] cudaMallocAsync failed: out of memory"), True),
        (MemoryError(), True),
        (RuntimeError("[Inverse::eval_cpu] LU factorization failed"), False),
        (ValueError("Attempting to allocate a negative size"), False),  # not MLX's error type
        (KeyError("malloc"), False),
    ],
)
def test_out_of_memory_is_told_by_type_and_message(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_requesters_see_503_for_memory_a_generic_500_for_faults_and_input_errors_as_they_are() -> (
    None
):
    oom = EngineFailed(out_of_memory()).generation_error()
    assert isinstance(oom, OutOfMemoryError)
    assert "8589934592" not in str(oom)  # details stay in the log
    fault = EngineFailed(RuntimeError("secret internals")).generation_error()
    assert type(fault) is GenerationError
    assert str(fault) == "generation failed: internal error"
    assert isinstance(fault.__cause__, RuntimeError)  # for the log
    # A fault in a step is never described, even one of an input error's type...
    assert "shape" not in str(EngineFailed(ValueError("bad shape")).generation_error())
    # ...but a prompt the engine refused at admission is.
    refused = EngineFailed(PromptError("empty prompt"), admission=True).generation_error()
    assert str(refused) == "generation failed: empty prompt"


def _req(seq_id: int, prompt: list[int]) -> SequenceRequest:
    return SequenceRequest(
        seq_id=seq_id, prompt=tuple(prompt), sampling=SamplingOptions(), max_tokens=8
    )


def _policy() -> SchedulerPolicy[str]:
    return SchedulerPolicy[str](
        PolicyConfig(max_queue=8, parallel=2, cache_bytes=8 * STEP * BPT, kv_bytes_per_token=BPT)
    )


def _save_entry(policy: SchedulerPolicy[str], seq_id: int, prompt: list[int]) -> int:
    """Run ``seq_id`` to its end and have the engine keep its positions; the entry id."""
    policy.enqueue(_req(seq_id, prompt), str(seq_id))
    job = policy.next_job()
    policy.job_done(job, [])
    policy.record(TokenEvent(seq_id=seq_id, token=7, finish=FinishReason.LENGTH))
    job = policy.next_job()
    (removal,) = job.removals
    assert removal.save_as is not None
    policy.job_done(job, [len(prompt) + 1])
    return removal.save_as


def test_a_failed_step_forgets_its_sequences_and_lost_entries_and_frees_their_rows() -> None:
    policy = _policy()
    kept = _save_entry(policy, 1, [1, 2, 3])
    lost = _save_entry(policy, 2, [4, 5, 6])
    policy.enqueue(_req(3, [7, 8]), "three")
    policy.enqueue(_req(4, [9, 9]), "four")
    policy.enqueue(_req(5, [6, 6]), "five")
    policy.job_done(policy.next_job(), [])
    assert policy.active == 2
    policy.step_failed([3, 4], [lost])
    assert policy.active == 0
    assert policy.payload(3) is None
    assert policy.prefixes.lookup([4, 5, 6, 0]) is None
    assert policy.prefixes.lookup([1, 2, 3, 0]) == (kept, 3)
    # The batch emptied: its rows are free for the queued one, nothing to remove first.
    job = policy.next_job()
    assert job.removals == ()
    assert [r.seq_id for r in job.admits] == [5]


def test_running_out_of_memory_evicts_every_prefix_entry() -> None:
    policy = _policy()
    entries = [_save_entry(policy, 1, [1, 2, 3]), _save_entry(policy, 2, [4, 5, 6])]
    policy.evict_all()
    assert len(policy.prefixes) == 0
    assert policy.prefixes.counters.evictions == 2
    assert sorted(policy.next_job().drops) == sorted(entries)  # the engine frees them next
