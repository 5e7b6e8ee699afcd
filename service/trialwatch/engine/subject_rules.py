"""Subject-level lab rules over a time window: `rild.suspected` and `eligibility.violation`.

Both are decided from the subject's state (the results their windows pin),
re-evaluated whenever an event can change them: a lab in their window, the
enrolment, a fraction. A lab that arrives before or after the enrolment or
the first fraction (other topics, no order between them) leads to the same
decision.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.retention import Pins, newest
from trialwatch.engine.state import LabResult, SubjectState, TreatmentEvent
from trialwatch.protocol import Protocol

SUBJECT_KEY = "subject"


def _in_window(state: SubjectState, analyte: str, start: datetime, end: datetime) -> list[LabResult]:
    """The analyte's kept results with start <= at <= end, in clinical-time order."""
    series = state.labs.get(analyte)
    if series is None:
        return []
    results = series.results
    lo = bisect.bisect_left(results, start, key=lambda r: r.at)
    hi = bisect.bisect_right(results, end, key=lambda r: r.at)
    return results[lo:hi]


def _rild_window(state: SubjectState, protocol: Protocol) -> tuple[TreatmentEvent, datetime] | None:
    if not state.sbrt_fractions:
        return None
    first = min(state.sbrt_fractions, key=lambda f: (f.at, f.seq))
    return first, first.at + timedelta(days=protocol.rules.rild.window_days)


def _rild_span(state: SubjectState, protocol: Protocol) -> tuple[datetime, datetime] | None:
    window = _rild_window(state, protocol)
    return (window[0].at, window[1]) if window is not None else None


def _screening_window(state: SubjectState, protocol: Protocol) -> tuple[datetime, datetime] | None:
    if state.enrolled_at is None:
        return None
    return state.enrolled_at - timedelta(days=protocol.rules.eligibility.screening_window_days), state.enrolled_at


Span = Callable[[SubjectState], tuple[datetime, datetime] | None]


def _window_pins(analytes: frozenset[str], span: Span) -> Pins:
    def pins(state: SubjectState, analyte: str) -> list[str]:
        window = span(state) if analyte in analytes else None
        return newest(_in_window(state, analyte, *window)) if window is not None else []

    return pins


def _in_span(window: tuple[datetime, datetime] | None, times: list[datetime]) -> bool:
    return window is not None and any(window[0] <= at <= window[1] for at in times)


def rild_pins(protocol: Protocol) -> Pins:
    """What `rild.suspected` reads: the criteria analytes' results in the window after the first fraction."""
    analytes = frozenset(c.analyte for c in protocol.rules.rild.criteria)
    return _window_pins(analytes, lambda state: _rild_span(state, protocol))


def rild_reads(state: SubjectState, protocol: Protocol, times: list[datetime]) -> bool:
    """Whether a criterion analyte's result at one of `times` (its new and former clinical time) is in the window."""
    return _in_span(_rild_span(state, protocol), times)


def eligibility_pins(protocol: Protocol) -> Pins:
    """What `eligibility.violation` reads: the screening labs' results in the window before enrolment."""
    analytes = frozenset(lab.analyte for lab in protocol.rules.eligibility.labs)
    return _window_pins(analytes, lambda state: _screening_window(state, protocol))


def eligibility_reads(state: SubjectState, protocol: Protocol, times: list[datetime]) -> bool:
    """Whether a screening analyte's result at one of `times` is in the screening window."""
    return _in_span(_screening_window(state, protocol), times)


def _num(value: Decimal) -> float:
    return float(value)


def evaluate_rild(book: AlertBook, protocol: Protocol) -> None:
    """Within the window after the first SBRT fraction, ALP or a transaminase above its ULN multiple."""
    state = book.state
    spec = protocol.rules.rild
    window = _rild_window(state, protocol)
    if window is None:
        return
    first, window_end = window
    breaches: list[dict[str, Any]] = []
    event_ids: list[str] = [first.event_id]
    breach_times: list[datetime] = []
    for criterion in spec.criteria:
        in_window = _in_window(state, criterion.analyte, first.at, window_end)
        if not in_window:
            continue
        latest = in_window[-1]
        limit = criterion.above_uln * latest.uln
        if latest.value > limit:
            event_ids.append(latest.event_id)
            breach_times.append(latest.at)
            breaches.append(
                {
                    "analyte": criterion.analyte,
                    "value": _num(latest.value),
                    "uln": _num(latest.uln),
                    "uln_origin": latest.uln_origin,
                    "threshold": f"> {criterion.above_uln} × ULN",
                    "times_uln": float(round(latest.value / latest.uln, 3)),
                    "at": latest.at.isoformat(),
                }
            )
    evidence = {
        "event_ids": event_ids,
        "first_fraction_at": first.at.isoformat(),
        "window_ends_at": window_end.isoformat(),
        "breaches": breaches,
        "parameters": {
            "window_days": spec.window_days,
            "criteria": [{"analyte": c.analyte, "above_uln": float(c.above_uln)} for c in spec.criteria],
        },
        "protocol_version": protocol.version,
    }
    rec = book.open_record("rild.suspected", SUBJECT_KEY)
    if breaches and rec is None:
        names = ", ".join(f"{b['analyte'].upper()} {b['times_uln']} × ULN" for b in breaches)
        book.open(
            rule="rild.suspected",
            key=SUBJECT_KEY,
            opening_event_id=event_ids[-1],
            severity=spec.severity,
            started_at=min(breach_times),
            evidence=evidence,
            summary=f"Suspected radiation-induced liver disease: {names} within {spec.window_days} days of SBRT",
        )
    elif not breaches and rec is not None:
        book.resolve(
            rec,
            ended_at=book.occurred_at,
            evidence={**evidence, "resolved_because": "the latest in-window results no longer breach"},
            summary="Resolved: rild.suspected, the latest in-window liver results no longer breach",
        )


def eligibility_failures(state: SubjectState, protocol: Protocol) -> list[dict[str, Any]]:
    """Checkable inclusion criteria that the enrolment and its screening labs fail."""
    spec = protocol.rules.eligibility
    failures: list[dict[str, Any]] = []
    if state.age_years is not None and not spec.min_age_years <= state.age_years <= spec.max_age_years:
        failures.append(
            {"criterion": "age", "value": state.age_years, "allowed": f"{spec.min_age_years}-{spec.max_age_years}"}
        )
    if state.kps is not None and state.kps < spec.min_kps:
        failures.append({"criterion": "kps", "value": state.kps, "allowed": f">= {spec.min_kps}"})
    if state.child_pugh_score is not None and state.child_pugh_score > spec.max_child_pugh_score:
        failures.append(
            {
                "criterion": "child_pugh_score",
                "value": state.child_pugh_score,
                "allowed": f"<= {spec.max_child_pugh_score}",
            }
        )
    if state.first_line_regimen is not None and state.first_line_regimen not in spec.allowed_first_line:
        failures.append({"criterion": "first_line_regimen", "value": state.first_line_regimen})
    window = _screening_window(state, protocol)
    if window is None:
        return failures
    for lab in spec.labs:
        screened = _in_window(state, lab.analyte, *window)
        if not screened:
            continue
        screening = screened[-1]
        if lab.at_least is not None and screening.value < lab.at_least:
            failures.append(
                {
                    "criterion": f"lab.{lab.analyte}",
                    "value": _num(screening.value),
                    "unit": screening.unit,
                    "allowed": f">= {lab.at_least}",
                    "event_id": screening.event_id,
                }
            )
        if lab.at_most_uln is not None and screening.value > lab.at_most_uln * screening.uln:
            failure = {
                "criterion": f"lab.{lab.analyte}",
                "value": _num(screening.value),
                "unit": screening.unit,
                "uln": _num(screening.uln),
                "allowed": f"<= {lab.at_most_uln} × ULN",
                "event_id": screening.event_id,
            }
            if lab.analyte == "creatinine":
                failure["note"] = "creatinine clearance > 60 mL/min would also qualify; the events do not carry it"
            failures.append(failure)
    return failures


def evaluate_eligibility(book: AlertBook, protocol: Protocol) -> None:
    state = book.state
    if state.enrolled_event_id is None:
        return
    failures = eligibility_failures(state, protocol)
    rec = book.open_record("eligibility.violation", SUBJECT_KEY)
    evidence = {
        "event_ids": [state.enrolled_event_id, *(f["event_id"] for f in failures if "event_id" in f)],
        "failures": failures,
        "screening_window_days": protocol.rules.eligibility.screening_window_days,
        "protocol_version": protocol.version,
    }
    if failures and rec is None:
        assert state.enrolled_at is not None
        book.open(
            rule="eligibility.violation",
            key=SUBJECT_KEY,
            opening_event_id=state.enrolled_event_id,
            severity=protocol.rules.eligibility.severity,
            started_at=state.enrolled_at,
            evidence=evidence,
            summary="Enrolled outside the eligibility criteria: " + ", ".join(f["criterion"] for f in failures),
        )
    elif not failures and rec is not None:
        book.resolve(
            rec,
            ended_at=book.occurred_at,
            evidence={**evidence, "resolved_because": "the screening values were corrected"},
            summary="Resolved: eligibility.violation, the corrected screening values meet the criteria",
        )
