"""The rule engine: `(subject state, event or clock tick, now) -> (new state, alert messages)`.

No Kafka, Faust, metrics or logging here. The live worker and `trialwatch
replay` are its only callers, so replay is the oracle for the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from trialwatch.contract import AdverseEvent, AlertMessage, Enrollment, InputEvent, Lab, Scan, Treatment
from trialwatch.engine import adverse_events, labs, recist, retention, subject_rules, toxicity, treatment
from trialwatch.engine.lifecycle import AlertBook, Memory
from trialwatch.engine.state import SubjectState
from trialwatch.protocol import Protocol

_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock reached `at` for this subject: deadlines due at or before it may fire."""

    subject_id: str
    at: datetime


class Engine:
    """The protocol's rules, bound to one protocol version.

    Each event re-evaluates only the rules it can change: a lab its analyte's
    rules and the subject rules that read that analyte, an adverse event the
    AE rules, a scan RECIST, a treatment event or an enrolment the treatment
    rules (and, for an enrolment, eligibility). A tick only the clock's rules.
    The rules read the state through indexes (results by analyte in clinical
    order), and the state keeps what the rules declare they need (retention).
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.lab_rules = labs.lab_rules(protocol)
        self.rules_by_analyte: dict[str, list[labs.LabRule]] = {}
        for rule in self.lab_rules:
            self.rules_by_analyte.setdefault(rule.analyte, []).append(rule)
        self.lab_pins: tuple[retention.Pins, ...] = (
            labs.pinned_results,
            subject_rules.rild_pins(protocol),
            subject_rules.eligibility_pins(protocol),
        )
        # The analytes the subject rules read (RILD, eligibility): a lab of another skips them.
        self.rild_analytes = frozenset(c.analyte for c in protocol.rules.rild.criteria)
        self.screening_analytes = frozenset(lab.analyte for lab in protocol.rules.eligibility.labs)
        self.memory = Memory(resolved=treatment.REMEMBERS_RESOLVED, episodes=labs.REMEMBERS_EPISODES)

    def apply(
        self, state: SubjectState | None, event: InputEvent | Tick, now: datetime
    ) -> tuple[SubjectState, list[AlertMessage]]:
        """Apply one event (or tick) to a subject.

        The engine takes ownership of `state` and returns the next state (it
        may be the same object, updated). An `event_id` seen before changes
        nothing and raises nothing: publishers may re-send.
        """
        if state is not None and state.__dict__.pop("_unbounded", False):
            self.bound(state)
        if isinstance(event, Tick):
            if state is None:
                # A tick for a subject with no state has nothing to check.
                return SubjectState(subject_id=event.subject_id, site_id=""), []
            book = AlertBook(state, self.protocol.trial, event.at, now, self.memory)
            self._evaluate_clock(book, min(event.at, now), event.at)
            return state, book.messages

        if state is None:
            state = SubjectState(subject_id=event.subject_id, site_id=event.site_id)
        if not retention.first_time(state, event.event_id) or _already_applied(state, event):
            return state, []
        state.seq += 1
        book = AlertBook(state, self.protocol.trial, event.occurred_at, now, self.memory)

        if isinstance(event, Enrollment):
            state.arm = event.arm
            state.site_id = event.site_id
            state.enrolled_event_id = event.event_id
            state.first_line_regimen = event.first_line_regimen
            state.enrolled_at = event.occurred_at
            state.age_years = event.age_years
            state.kps = event.kps
            state.child_pugh_score = event.child_pugh_score
            self._evaluate_treatment(book, _NEVER, event.occurred_at)
            subject_rules.evaluate_eligibility(book, self.protocol)
        elif isinstance(event, Treatment):
            treatment.record_treatment(state, event)
            # A treatment event may fire window deadlines up to its own clinical
            # time: the fractions travel on its topic, in order. Another topic's
            # event says nothing about fractions not yet read, so it fires none.
            # Deadlines past on the wall clock are the ticks' business.
            self._evaluate_treatment(book, min(event.occurred_at, now), event.occurred_at)
            subject_rules.evaluate_rild(book, self.protocol)
        elif isinstance(event, Lab):
            self._apply_lab(book, event)
        elif isinstance(event, Scan):
            recist.record_scan(state, event)
            recist.evaluate(book, event, self.protocol)
        elif isinstance(event, AdverseEvent):
            report = adverse_events.record_report(state, event)
            adverse_events.evaluate_grade(book, event, report, self.protocol)
            adverse_events.evaluate_serious(book, event, report, self.protocol)
            self._compact_adverse_events(state)
        return state, book.messages

    def bound(self, state: SubjectState) -> None:
        """Apply the retention bounds to the whole state (one read in an older format)."""
        for analyte in list(state.labs):
            retention.compact_series(state, analyte, self.lab_pins)
        self._compact_adverse_events(state)

    def _compact_adverse_events(self, state: SubjectState) -> None:
        pinned = adverse_events.pinned_reports(state)
        retention.compact_adverse_events(state, pinned, toxicity.pinned_reports(state, self.protocol))

    def _apply_lab(self, book: AlertBook, lab: Lab) -> None:
        state = book.state
        # The clinical times this event touches: its own, and its former version's (a correction may move it).
        previous = labs.current_version(state, lab.result_key)
        times = [lab.occurred_at] if previous is None else [lab.occurred_at, previous.at]
        changed = labs.record_result(state, lab, self.protocol, previous)
        rules = self.rules_by_analyte.get(lab.analyte)
        if rules:
            view = labs.AnalyteView.of(state, lab.analyte)
            for rule in rules:
                labs.evaluate(rule, book, lab, changed, self.protocol, view)
        # A previous version sent as another analyte changed that analyte's results too.
        analytes = {lab.analyte} if previous is None else {lab.analyte, previous.analyte}
        if not analytes.isdisjoint(self.rild_analytes) and subject_rules.rild_reads(state, self.protocol, times):
            subject_rules.evaluate_rild(book, self.protocol)
        if not analytes.isdisjoint(self.screening_analytes) and subject_rules.eligibility_reads(
            state, self.protocol, times
        ):
            subject_rules.evaluate_eligibility(book, self.protocol)
        retention.compact_series(state, lab.analyte, self.lab_pins)

    def _evaluate_treatment(self, book: AlertBook, horizon: datetime, occurred_at: datetime) -> None:
        """The rules over the treatment history and the clock (window, deviations)."""
        # The next deadline depends on the window's alerts only, not on the deviations'.
        self._evaluate_clock(book, horizon, occurred_at)
        treatment.evaluate_deviations(book, self.protocol)

    def _evaluate_clock(self, book: AlertBook, horizon: datetime, occurred_at: datetime) -> None:
        """A tick: the only rules the clock alone can change (the SBRT window)."""
        treatment.evaluate_window(book, self.protocol, horizon, occurred_at)
        book.state.next_deadline_at = treatment.next_deadline(book.state, self.protocol)


def _already_applied(state: SubjectState, event: InputEvent) -> bool:
    """The event is still the current version of what it describes: a re-send past the recent ids."""
    if isinstance(event, Lab):
        return labs.already_applied(state, event)
    if isinstance(event, AdverseEvent):
        return adverse_events.already_applied(state, event)
    if isinstance(event, Scan):
        return recist.already_applied(state, event)
    if isinstance(event, Treatment):
        return treatment.already_applied(state, event)
    return state.enrolled_event_id == event.event_id
