"""The tick policy: when a due deadline is ticked, deferred or re-sent (the worker's timer only sends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from trialwatch.ticking import TickPolicy

DEADLINE = datetime(2025, 3, 15, 0, 0, tzinfo=UTC)
A, B = b"TW-A", b"TW-B"


def never_behind(partition: int) -> bool:
    return False


def test_a_due_deadline_is_ticked_once_then_again_only_after_the_resend_delay() -> None:
    policy = TickPolicy(max_defer_s=60, resend_after_s=30)
    now = DEADLINE + timedelta(seconds=1)
    due = [(0, A, DEADLINE)]

    first = policy.select(due, now, 100.0, never_behind)
    policy.ticked(A, DEADLINE, 100.0)

    assert (first, policy.select(due, now, 129.0, never_behind)) == (due, [])
    assert policy.select(due, now, 130.5, never_behind) == due  # the first tick seems lost


def test_a_new_deadline_of_the_same_subject_is_ticked_at_once() -> None:
    policy = TickPolicy(max_defer_s=60)
    policy.ticked(A, DEADLINE, 100.0)
    later = DEADLINE + timedelta(days=4)

    assert policy.select([(0, A, later)], later, 101.0, never_behind) == [(0, A, later)]


def test_a_partition_with_unread_treatment_records_defers_its_ticks_up_to_the_limit() -> None:
    policy = TickPolicy(max_defer_s=60)
    due = [(1, A, DEADLINE), (2, B, DEADLINE)]

    def behind(partition: int) -> bool:
        return partition == 1

    soon = policy.select(due, DEADLINE + timedelta(seconds=59), 0.0, behind)
    late = policy.select(due, DEADLINE + timedelta(seconds=60), 0.0, behind)

    assert (soon, late) == ([(2, B, DEADLINE)], due)
