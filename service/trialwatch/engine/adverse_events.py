"""Adverse-event rules: `ae.grade3plus` and `ae.serious`, one alert per `ae_id` episode."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from trialwatch.contract import AdverseEvent
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.state import AdverseEventReport, SubjectState
from trialwatch.protocol import Protocol


def record_report(state: SubjectState, ae: AdverseEvent) -> AdverseEventReport:
    """Keep the AE's current version: the update recorded last wins; a late older update is superseded."""
    report = AdverseEventReport(
        ae_id=ae.ae_key,
        term=ae.term,
        grade=ae.grade,
        serious=ae.serious,
        attribution=ae.attribution,
        attributed_to=list(ae.attributed_to) if ae.attributed_to is not None else None,
        at=ae.recorded_or_occurred_at,
        seq=state.seq,
        event_id=ae.event_id,
    )
    current = state.adverse_events.get(ae.ae_key)
    if current is None or (report.at, report.seq) >= (current.at, current.seq):
        state.adverse_events[ae.ae_key] = report
        return report
    return current


def already_applied(state: SubjectState, ae: AdverseEvent) -> bool:
    """The event is the AE's current version (a re-send)."""
    current = state.adverse_events.get(ae.ae_key)
    return current is not None and current.event_id == ae.event_id


# What the AE rules read of the past: the current version of every AE with an
# open alert (an update escalates or resolves it). Others may be forgotten.
RULES = ("ae.grade3plus", "ae.serious")


def pinned_reports(state: SubjectState) -> set[str]:
    return {rec.key for rec in state.alerts.values() if rec.rule in RULES and rec.status == "firing"}


def _evidence(report: AdverseEventReport, ae: AdverseEvent, protocol: Protocol, **extra: Any) -> dict[str, Any]:
    return {
        "event_ids": [ae.event_id],
        "ae_id": ae.ae_key,
        "term": report.term,
        "grade": report.grade,
        "serious": report.serious,
        "attribution": report.attribution,
        "attributed_to": report.attributed_to,
        "protocol_version": protocol.version,
        "ctcae_version": protocol.ctcae_version,
        **extra,
    }


def evaluate_grade(book: AlertBook, ae: AdverseEvent, report: AdverseEventReport, protocol: Protocol) -> None:
    spec = protocol.rules.ae_grade3plus
    rule, key = "ae.grade3plus", ae.ae_key
    rec = book.open_record(rule, key)
    breaching = report.grade >= spec.min_grade
    params = {"min_grade": spec.min_grade}
    if rec is None and breaching:
        book.open(
            rule=rule,
            key=key,
            opening_event_id=ae.event_id,
            severity=spec.severity_by_grade[report.grade],
            ctcae_grade=report.grade,
            started_at=ae.occurred_at,
            evidence=_evidence(report, ae, protocol, parameters=params),
            summary=f"Adverse event '{report.term}' CTCAE grade {report.grade} ({report.attribution})",
        )
    elif rec is not None and breaching:
        book.escalate(
            rec,
            severity=spec.severity_by_grade[report.grade],
            ctcae_grade=report.grade,
            evidence=_evidence(report, ae, protocol, parameters=params),
            summary=f"Escalated: adverse event '{report.term}' now CTCAE grade {report.grade}",
        )
    elif rec is not None and not breaching:
        book.resolve(
            rec,
            ended_at=ae.occurred_at,
            evidence=_evidence(report, ae, protocol, parameters=params, resolved_because="grade updated below 3"),
            summary=f"Resolved: adverse event '{report.term}' updated to CTCAE grade {report.grade}",
        )


def evaluate_serious(book: AlertBook, ae: AdverseEvent, report: AdverseEventReport, protocol: Protocol) -> None:
    spec = protocol.rules.ae_serious
    rule, key = "ae.serious", ae.ae_key
    rec = book.open_record(rule, key)
    params = {"report_within_hours": spec.report_within_hours}
    if rec is None and report.serious:
        due = report.at + timedelta(hours=spec.report_within_hours)
        book.open(
            rule=rule,
            key=key,
            opening_event_id=ae.event_id,
            severity=spec.severity,
            ctcae_grade=report.grade,
            report_due_at=due,
            started_at=ae.occurred_at,
            evidence=_evidence(
                report, ae, protocol, parameters=params, reporting_clock_starts_at=report.at.isoformat()
            ),
            summary=(
                f"Serious adverse event '{report.term}' (CTCAE grade {report.grade}); "
                f"expedited report due by {due.isoformat()}"
            ),
        )
    elif rec is not None and not report.serious:
        book.resolve(
            rec,
            ended_at=ae.occurred_at,
            evidence=_evidence(report, ae, protocol, parameters=params, resolved_because="updated to not serious"),
            summary=f"Resolved: adverse event '{report.term}' updated to not serious",
        )
