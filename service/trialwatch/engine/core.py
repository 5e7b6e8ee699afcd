"""The rule engine: `(subject state, event or clock tick, now) -> (new state, alert messages)`.

No Kafka, Faust, metrics or logging here. The live worker and `trialwatch
replay` are its only callers, so replay is the oracle for the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from trialwatch.contract import AdverseEvent, AlertMessage, Enrollment, InputEvent, Lab, Scan, Treatment
from trialwatch.engine import adverse_events, labs, recist, subject_rules, treatment
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.state import SubjectState
from trialwatch.protocol import Protocol

_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock reached `at` for this subject: deadlines due at or before it may fire."""

    subject_id: str
    at: datetime


class Engine:
    """The protocol's rules, bound to one protocol version."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.lab_rules = labs.lab_rules(protocol)

    def apply(
        self, state: SubjectState | None, event: InputEvent | Tick, now: datetime
    ) -> tuple[SubjectState, list[AlertMessage]]:
        """Apply one event (or tick) to a subject.

        The engine takes ownership of `state` and returns the next state (it
        may be the same object, updated). An `event_id` seen before changes
        nothing and raises nothing: publishers may re-send.
        """
        if isinstance(event, Tick):
            if state is None:
                # A tick for a subject with no state has nothing to check.
                return SubjectState(subject_id=event.subject_id, site_id=""), []
            book = AlertBook(state, self.protocol.trial, event.at, now)
            self._evaluate_subject(book, min(event.at, now), event.at)
            return state, book.messages

        if state is None:
            state = SubjectState(subject_id=event.subject_id, site_id=event.site_id)
        if event.event_id in state.seen_event_ids:
            return state, []
        state.seen_event_ids.add(event.event_id)
        state.seq += 1
        book = AlertBook(state, self.protocol.trial, event.occurred_at, now)

        if isinstance(event, Enrollment):
            state.arm = event.arm
            state.site_id = event.site_id
            state.enrolled_event_id = event.event_id
            state.first_line_regimen = event.first_line_regimen
            state.enrolled_at = event.occurred_at
            state.age_years = event.age_years
            state.kps = event.kps
            state.child_pugh_score = event.child_pugh_score
        elif isinstance(event, Treatment):
            treatment.record_treatment(state, event)
        elif isinstance(event, Lab):
            changed = labs.record_result(state, event, self.protocol)
            for rule in self.lab_rules:
                if rule.analyte == event.analyte:
                    labs.evaluate(rule, book, event, changed, self.protocol)
        elif isinstance(event, Scan):
            recist.record_scan(state, event)
            recist.evaluate(book, event, self.protocol)
        elif isinstance(event, AdverseEvent):
            report = adverse_events.record_report(state, event)
            adverse_events.evaluate_grade(book, event, report, self.protocol)
            adverse_events.evaluate_serious(book, event, report, self.protocol)
        # A treatment event may fire window deadlines up to its own clinical
        # time: the fractions travel on its topic, in order. Another topic's
        # event says nothing about fractions not yet read, so it fires none.
        # Deadlines past on the wall clock are the ticks' business.
        horizon = min(event.occurred_at, now) if isinstance(event, Treatment) else _NEVER
        self._evaluate_subject(book, horizon, event.occurred_at)
        return state, book.messages

    def _evaluate_subject(self, book: AlertBook, horizon: datetime, occurred_at: datetime) -> None:
        """Rules over the subject's whole history and the clock: run after every event and tick."""
        treatment.evaluate_window(book, self.protocol, horizon, occurred_at)
        treatment.evaluate_deviations(book, self.protocol)
        subject_rules.evaluate_rild(book, self.protocol)
        subject_rules.evaluate_eligibility(book, self.protocol)
        book.state.next_deadline_at = treatment.next_deadline(book.state, self.protocol)
