"""`trialwatch replay`: the live service's engine over an event file, on an event-time clock."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from datetime import datetime

from trialwatch.contract import AlertMessage, InputEvent
from trialwatch.engine import Engine, SubjectState, Tick
from trialwatch.engine.toxicity import ArmFact, ArmMonitor, ArmState, can_change_fact, changed_fact, subject_fact
from trialwatch.event_file import BadLine, read_event_file, read_line
from trialwatch.failures import where

# Where the event-file reader lived before it moved out of the engine's way.
__all__ = ["BadLine", "Replay", "read_event_file", "read_line"]


class Replay:
    """Runs events through the engine in file order, as one partition-ordered stream per subject.

    The clock is the latest `occurred_at` seen. Deadlines due at or before an
    event's `occurred_at` fire before that event is applied, as the live
    service's timer would have fired them on the wall clock.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.states: dict[str, SubjectState] = {}
        self.clock: datetime | None = None
        # (deadline, subject) min-heap; entries whose deadline moved are skipped.
        self._deadlines: list[tuple[datetime, str]] = []
        # The arm-level monitor runs after the subject engine, as its agent does
        # live (`apply`); a parallel replay's shards return the facts from
        # `apply_event` and their parent runs them through `apply_fact`.
        self.arm_monitor = ArmMonitor(engine.protocol)
        self.arms: dict[str, ArmState] = {}
        # Internal errors since the caller last took them (see take_errors).
        self.errors: list[str] = []

    def _failed(self, exc: Exception, what: str) -> None:
        self.errors.append(f"processing_error: {type(exc).__name__} in {what} ({where(exc)})")

    def take_errors(self) -> list[str]:
        """What failed inside the engine since the last call, for the caller to report."""
        errors, self.errors = self.errors, []
        return errors

    def fire_due(self, at: datetime) -> Iterator[tuple[datetime, str, list[AlertMessage]]]:
        """Fire every deadline due at or before `at`, earliest first (then by subject), each at its own time.

        Yields (deadline, subject, alerts) per tick fired; a tick's errors are in `self.errors` when it is yielded.
        """
        while self._deadlines and self._deadlines[0][0] <= at:
            deadline, sid = heapq.heappop(self._deadlines)
            state = self.states[sid]
            if state.next_deadline_at != deadline:
                continue  # superseded: the subject's deadline moved since it was queued
            try:
                state, alerts = self.engine.apply(state, Tick(sid, deadline), self._now(deadline))
            except Exception as exc:  # noqa: BLE001 - the worker's policy: report, drop the deadline, go on
                self._failed(exc, "deadline evaluation")
                yield deadline, sid, []
                continue
            if state.next_deadline_at == deadline:
                # A tick at a deadline decides it; if not, report it rather than loop.
                self.errors.append(f"processing_error: deadline {deadline.isoformat()} not decided by its tick")
                yield deadline, sid, []
                continue
            self._store(sid, state)
            yield deadline, sid, alerts

    def _advance(self, at: datetime) -> list[AlertMessage]:
        return [alert for _, _, alerts in self.fire_due(at) for alert in alerts]

    def _store(self, sid: str, state: SubjectState) -> None:
        self.states[sid] = state
        if state.next_deadline_at is not None:
            heapq.heappush(self._deadlines, (state.next_deadline_at, sid))

    def _now(self, at: datetime) -> datetime:
        if self.clock is None or at > self.clock:
            self.clock = at
        return self.clock

    def pass_by(self, at: datetime) -> None:
        """Another shard's event at `at` (parallel replay): the clock moves as if it were applied here."""
        self._now(at)

    def apply_event(self, event: InputEvent) -> tuple[list[AlertMessage], tuple[ArmFact, datetime] | None]:
        """The event itself, after the deadlines due before it fired: its alerts and its arm fact, if new."""
        now = self._now(event.occurred_at)
        previous = self.states.get(event.subject_id)
        facts = can_change_fact(event)
        before = subject_fact(previous, self.engine.protocol, "") if facts and previous is not None else None
        try:
            state, alerts = self.engine.apply(previous, event, now)
        except Exception as exc:  # noqa: BLE001 - the worker's policy: report the event, go on with the next
            # Unlike the live worker, which re-reads the saved state, replay
            # keeps what the engine left: a failure mid-rule (a bug) may leave
            # this subject's state half-updated. Reported either way.
            self._failed(exc, "rule evaluation")
            return [], None
        self._store(event.subject_id, state)
        fact = changed_fact(before, subject_fact(state, self.engine.protocol, event.event_id)) if facts else None
        return alerts, (fact, now) if fact is not None else None

    def apply_fact(self, fact: ArmFact, now: datetime) -> list[AlertMessage]:
        """One subject's arm fact through the arm-level monitor."""
        try:
            self.arms[fact.arm], alerts = self.arm_monitor.apply(self.arms.get(fact.arm), fact, now)
        except Exception as exc:  # noqa: BLE001 - the worker's policy for an arm fact
            self._failed(exc, "the arm-level monitor")
            return []
        return alerts

    def apply(self, event: InputEvent) -> list[AlertMessage]:
        out = self._advance(event.occurred_at)
        alerts, fact = self.apply_event(event)
        out += alerts
        if fact is not None:
            out += self.apply_fact(*fact)
        return out

    def finish(self, as_of: datetime | None) -> list[AlertMessage]:
        if as_of is None:
            return []
        out = self._advance(as_of)
        self._now(as_of)
        return out
