"""Treatment rules: the SBRT start window and the protocol deviations.

Every rule here is a function of the subject's state and the clock, evaluated
after each event and each tick. None depends on the order in which events of
different topics arrive (Kafka orders only within a partition): an
enrolment that arrives after the second-line start still leads to the same
decision, at the time it arrives.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from trialwatch.contract import Treatment
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.retention import add_treatment
from trialwatch.engine.state import AlertRecord, SubjectState, TreatmentEvent
from trialwatch.protocol import Protocol

_LISTS = {
    "second_line_start": "second_line_starts",
    "sbrt_fraction": "sbrt_fractions",
    "sbrt_completed": "sbrt_completions",
    "systemic_held": "systemic_holds",
    "systemic_resumed": "systemic_resumptions",
    "withdrawal": "withdrawals",
}

WINDOW_KEY = "second_line"
SUBJECT_KEY = "subject"


# What the treatment rules read of the past: the earliest events of each kind
# (retention.TREATMENTS_KEPT), and their own resolved alerts: the window
# rules fire once per subject, the deviations once and never resolve.
REMEMBERS_RESOLVED = frozenset({"sbrt.window.at_risk", "sbrt.window.missed"})


def already_applied(state: SubjectState, event: Treatment) -> bool:
    """The event is a kept treatment event (a re-send)."""
    return any(item.event_id == event.event_id for item in getattr(state, _LISTS[event.kind]))


def record_treatment(state: SubjectState, event: Treatment) -> None:
    item = TreatmentEvent(
        event_id=event.event_id,
        at=event.occurred_at,
        seq=state.seq,
        regimen=event.regimen,
        reason=event.reason,
        fraction=event.fraction,
    )
    add_treatment(getattr(state, _LISTS[event.kind]), item)


def _first(items: list[TreatmentEvent]) -> TreatmentEvent | None:
    return min(items, key=lambda i: (i.at, i.seq), default=None)


def end_of_calendar_day(start: datetime, days_after: int) -> datetime:
    """Midnight that ends the `days_after`-th calendar day after `start`, in `start`'s own UTC offset."""
    day = start.date() + timedelta(days=days_after + 1)
    return datetime.combine(day, time(0, 0), tzinfo=start.tzinfo)


def window_deadlines(state: SubjectState, protocol: Protocol) -> tuple[datetime, datetime] | None:
    start = _first(state.second_line_starts)
    if start is None:
        return None
    spec = protocol.rules.sbrt_window
    return end_of_calendar_day(start.at, spec.at_risk_after_days), end_of_calendar_day(start.at, spec.missed_after_days)


def next_deadline(state: SubjectState, protocol: Protocol) -> datetime | None:
    """The earliest window deadline not yet decided, even one already past; None when nothing is pending.

    A past one is fired by the next tick rather than by the event being
    processed: backfilled history (a start months old, its fractions right
    behind it in the partition) is then complete before the deadline is
    judged, instead of raising an alert that the next record resolves.
    """
    deadlines = window_deadlines(state, protocol)
    if deadlines is None or state.arm != "sbrt":
        return None
    at_risk, missed = deadlines
    first_fraction = _first(state.sbrt_fractions)
    decided_missed = f"sbrt.window.missed|{WINDOW_KEY}" in state.alerts or (
        first_fraction is not None and first_fraction.at < missed
    )
    decided_at_risk = decided_missed or f"sbrt.window.at_risk|{WINDOW_KEY}" in state.alerts
    pending = [d for d, decided in ((at_risk, decided_at_risk), (missed, decided_missed)) if not decided]
    return min(pending, default=None)


def _window_evidence(
    state: SubjectState, protocol: Protocol, at_risk: datetime, missed: datetime, **extra: Any
) -> dict[str, Any]:
    start = _first(state.second_line_starts)
    fraction = _first(state.sbrt_fractions)
    spec = protocol.rules.sbrt_window
    return {
        "event_ids": [e.event_id for e in (start, fraction) if e is not None],
        "second_line_start_at": start.at.isoformat() if start else None,
        "first_fraction_at": fraction.at.isoformat() if fraction else None,
        "at_risk_deadline": at_risk.isoformat(),
        "missed_deadline": missed.isoformat(),
        "parameters": {
            "at_risk_after_days": spec.at_risk_after_days,
            "missed_after_days": spec.missed_after_days,
            "calendar_days_in_offset_of": "second_line_start",
        },
        "protocol_version": protocol.version,
        **extra,
    }


def evaluate_window(book: AlertBook, protocol: Protocol, horizon: datetime, occurred_at: datetime) -> None:
    """`sbrt.window.at_risk` and `sbrt.window.missed`, one episode each per subject.

    Deadlines up to `horizon` may fire: a tick's time, or an event's own
    clinical time (never later than the service clock).
    """
    now = horizon
    state = book.state
    deadlines = window_deadlines(state, protocol)
    if deadlines is None or state.arm != "sbrt":
        return
    at_risk_deadline, missed_deadline = deadlines
    spec = protocol.rules.sbrt_window
    fraction = _first(state.sbrt_fractions)
    in_window = fraction is not None and fraction.at < missed_deadline
    start = _first(state.second_line_starts)
    assert start is not None
    start_event = start.event_id

    missed = state.alerts.get(f"sbrt.window.missed|{WINDOW_KEY}")
    at_risk = state.alerts.get(f"sbrt.window.at_risk|{WINDOW_KEY}")

    if missed is None and now >= missed_deadline and not in_window:
        missed = book.open(
            rule="sbrt.window.missed",
            key=WINDOW_KEY,
            opening_event_id=start_event,
            severity=spec.missed_severity,
            started_at=missed_deadline,
            occurred_at=missed_deadline,
            evidence=_window_evidence(state, protocol, at_risk_deadline, missed_deadline),
            summary=(
                f"No SBRT fraction within {spec.missed_after_days} calendar days of the second-line start "
                f"({start.at.date().isoformat()}); window closed {missed_deadline.isoformat()}"
            ),
        )
    # At risk: no fraction in the window known yet (one after the window does not count).
    if at_risk is None and at_risk_deadline <= now < missed_deadline and not in_window:
        at_risk = book.open(
            rule="sbrt.window.at_risk",
            key=WINDOW_KEY,
            opening_event_id=start_event,
            severity=spec.at_risk_severity,
            started_at=at_risk_deadline,
            occurred_at=at_risk_deadline,
            evidence=_window_evidence(state, protocol, at_risk_deadline, missed_deadline),
            summary=(
                f"No SBRT fraction by the end of day {spec.at_risk_after_days} after the second-line start "
                f"({start.at.date().isoformat()}); the window closes {missed_deadline.isoformat()}"
            ),
        )
    if at_risk is not None and at_risk.status == "firing":
        if in_window:
            _resolve(book, at_risk, protocol, at_risk_deadline, missed_deadline, occurred_at, "an SBRT fraction")
        elif missed is not None and missed.status == "firing":
            _resolve(book, at_risk, protocol, at_risk_deadline, missed_deadline, occurred_at, "sbrt.window.missed")
    if missed is not None and missed.status == "firing" and in_window:
        _resolve(book, missed, protocol, at_risk_deadline, missed_deadline, occurred_at, "an in-window fraction")


def _resolve(
    book: AlertBook,
    rec: AlertRecord,
    protocol: Protocol,
    at_risk: datetime,
    missed: datetime,
    occurred_at: datetime,
    cause: str,
) -> None:
    why = {
        "an SBRT fraction": "an SBRT fraction was given",
        "sbrt.window.missed": "superseded by sbrt.window.missed",
        "an in-window fraction": "a fraction given inside the window was reported late",
    }[cause]
    book.resolve(
        rec,
        ended_at=occurred_at,
        evidence=_window_evidence(book.state, protocol, at_risk, missed, resolved_because=why),
        summary=f"Resolved: {rec.rule}, {why}",
    )


def _open_once(book: AlertBook, rule: str, **kwargs: Any) -> None:
    """Deviation alerts are one per subject and rule: a deviation that happened stays on record."""
    if f"{rule}|{SUBJECT_KEY}" not in book.state.alerts:
        book.open(rule=rule, key=SUBJECT_KEY, **kwargs)


def evaluate_deviations(book: AlertBook, protocol: Protocol) -> None:
    state = book.state
    rules = protocol.rules

    # protocol.regimen_mismatch: the stipulation for the first-line regimen.
    start = _first(state.second_line_starts)
    if start is not None and state.first_line_regimen is not None and start.regimen is not None:
        allowed = rules.regimen_mismatch.allowed_second_line.get(state.first_line_regimen, [])
        if start.regimen not in allowed:
            _open_once(
                book,
                "protocol.regimen_mismatch",
                opening_event_id=start.event_id,
                severity=rules.regimen_mismatch.severity,
                started_at=start.at,
                evidence={
                    "event_ids": [e for e in (state.enrolled_event_id, start.event_id) if e],
                    "first_line_regimen": state.first_line_regimen,
                    "second_line_regimen": start.regimen,
                    "allowed_second_line": allowed,
                    "protocol_version": protocol.version,
                },
                summary=(
                    f"Second-line {start.regimen} after first-line {state.first_line_regimen}; "
                    f"the protocol allows {' or '.join(allowed)}"
                ),
            )

    # protocol.crossover: control arm, an SBRT fraction with no earlier withdrawal for progression.
    if state.arm == "control":
        reason = rules.crossover.allowed_after_withdrawal_reason
        exits = [w.at for w in state.withdrawals if w.reason == reason]
        for fraction in sorted(state.sbrt_fractions, key=lambda f: (f.at, f.seq)):
            if not any(at < fraction.at for at in exits):
                _open_once(
                    book,
                    "protocol.crossover",
                    opening_event_id=fraction.event_id,
                    severity=rules.crossover.severity,
                    started_at=fraction.at,
                    evidence={
                        "event_ids": [fraction.event_id],
                        "fraction_at": fraction.at.isoformat(),
                        "earlier_withdrawal_for_progression": False,
                        "protocol_version": protocol.version,
                    },
                    summary="Control-arm subject received SBRT without an earlier withdrawal for progression",
                )
                break

    # protocol.systemic_held_during_sbrt.
    first_fraction = _first(state.sbrt_fractions)
    if first_fraction is not None:
        completed = _first([c for c in state.sbrt_completions if c.at >= first_fraction.at])
        for hold in sorted(state.systemic_holds, key=lambda h: (h.at, h.seq)):
            resumed = _first([r for r in state.systemic_resumptions if r.at >= hold.at])
            during_course = hold.at >= first_fraction.at and (completed is None or hold.at <= completed.at)
            carried_in = hold.at < first_fraction.at and (resumed is None or resumed.at > first_fraction.at)
            if during_course or carried_in:
                _open_once(
                    book,
                    "protocol.systemic_held_during_sbrt",
                    opening_event_id=hold.event_id,
                    severity=rules.systemic_held_during_sbrt.severity,
                    started_at=hold.at,
                    evidence={
                        "event_ids": [e.event_id for e in (hold, first_fraction, resumed) if e is not None],
                        "held_at": hold.at.isoformat(),
                        "resumed_at": resumed.at.isoformat() if resumed else None,
                        "first_fraction_at": first_fraction.at.isoformat(),
                        "sbrt_completed_at": completed.at.isoformat() if completed else None,
                        "protocol_version": protocol.version,
                    },
                    summary=(
                        "Systemic therapy held during the SBRT course"
                        if during_course
                        else "Systemic therapy held before the SBRT course and not resumed by its first fraction"
                    ),
                )
                break
