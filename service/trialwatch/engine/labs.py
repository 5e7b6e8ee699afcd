"""Lab rules: `lab.platelets.low` and `lab.bilirubin.high`, one alert per subject, rule and analyte."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from typing import Protocol as TypingProtocol

from trialwatch.contract import Lab, Severity
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.state import LabResult, SubjectState
from trialwatch.protocol import AeGradeRule, BilirubinRule, CtcaeTerm, GradeCriterion, PlateletsRule, Protocol
from trialwatch.units import ANALYTE_NAMES, CANONICAL_UNIT, DISPLAY_UNIT, plausible_reference_range, to_canonical


@dataclass(frozen=True, slots=True)
class Breach:
    severity: Severity
    ctcae_grade: int
    threshold: str
    threshold_value: Decimal


class LabRule(TypingProtocol):
    rule: str
    analyte: str

    def assess(self, result: LabResult, baseline: LabResult | None) -> Breach | None: ...

    def parameters(self) -> dict[str, Any]: ...


def _fmt(value: Decimal) -> str:
    return format(value.normalize(), "f")


class PlateletsLow:
    rule = "lab.platelets.low"

    def __init__(self, spec: PlateletsRule) -> None:
        self.analyte = spec.analyte
        self.bands = spec.bands  # mild to severe

    def assess(self, result: LabResult, baseline: LabResult | None) -> Breach | None:
        hit = None
        for band in self.bands:
            # CTCAE "<50-25": 50 itself is grade 2, so strictly below.
            if result.value < band.below:
                hit = band
        if hit is None:
            return None
        return Breach(hit.severity, hit.ctcae_grade, f"< {_fmt(hit.below)} ×10⁹/L", hit.below)

    def parameters(self) -> dict[str, Any]:
        return {"bands": [{"below": float(b.below), "severity": b.severity} for b in self.bands]}


class BilirubinHigh:
    rule = "lab.bilirubin.high"

    def __init__(self, spec: BilirubinRule) -> None:
        self.analyte = spec.analyte
        self.bands = spec.bands  # mild to severe

    def assess(self, result: LabResult, baseline: LabResult | None) -> Breach | None:
        hit = None
        for band in self.bands:
            # CTCAE ">1.5-3.0 x ULN": exactly 1.5 x ULN is still grade 1.
            if result.value > band.above_uln * result.uln:
                hit = band
        if hit is None:
            return None
        limit = hit.above_uln * result.uln
        return Breach(
            hit.severity,
            hit.ctcae_grade,
            f"> {_fmt(hit.above_uln)} × ULN ({_fmt(limit)} µmol/L)",
            limit,
        )

    def parameters(self) -> dict[str, Any]:
        return {"bands": [{"above_uln": float(b.above_uln), "severity": b.severity} for b in self.bands]}


_OPS = {"<": Decimal.__lt__, ">": Decimal.__gt__, ">=": Decimal.__ge__}


class CtcaeGrade3Plus:
    """`lab.ctcae.grade3plus` for one analyte graded by the protocol's CTCAE table."""

    rule = "lab.ctcae.grade3plus"

    def __init__(self, analyte: str, term: CtcaeTerm, spec: AeGradeRule) -> None:
        self.analyte = analyte
        self.term = term
        self.spec = spec

    def grade(self, result: LabResult, baseline: LabResult | None) -> tuple[int, GradeCriterion] | None:
        """The CTCAE grade of `result` and the criterion that gave it; None when normal."""
        abnormal = baseline is not None and baseline.value > baseline.uln
        criteria = self.term.abnormal_baseline if abnormal and self.term.abnormal_baseline else self.term.grades
        best: tuple[int, GradeCriterion] | None = None
        for criterion in criteria:
            reference = {
                "abs": Decimal(1),
                "lln": result.lln,
                "uln": result.uln,
                "bl": baseline.value if baseline is not None else None,
            }[criterion.of]
            if reference is None:
                continue
            if _OPS[criterion.op](result.value, criterion.times * reference) and (
                best is None or criterion.grade > best[0]
            ):
                best = (criterion.grade, criterion)
        return best

    def assess(self, result: LabResult, baseline: LabResult | None) -> Breach | None:
        graded = self.grade(result, baseline)
        if graded is None or graded[0] < self.spec.min_grade:
            return None
        grade, criterion = graded
        unit = DISPLAY_UNIT.get(result.unit, result.unit)
        if criterion.of == "abs":
            limit = criterion.times
            text = f"{criterion.op} {_fmt(limit)} {unit}"
        else:
            base = {"lln": result.lln, "uln": result.uln, "bl": baseline.value if baseline else Decimal(0)}
            limit = criterion.times * base[criterion.of]
            text = f"{criterion.op} {_fmt(criterion.times)} × {criterion.of.upper()} ({_fmt(limit)} {unit})"
        return Breach(self.spec.severity_by_grade[grade], grade, text, limit)

    def parameters(self) -> dict[str, Any]:
        return {
            "min_grade": self.spec.min_grade,
            "baseline": "last result at or before the second-line start",
            "grades": [c.model_dump(mode="json") for c in self.term.grades],
            "abnormal_baseline": (
                [c.model_dump(mode="json") for c in self.term.abnormal_baseline]
                if self.term.abnormal_baseline
                else None
            ),
        }


def lab_rules(protocol: Protocol) -> list[LabRule]:
    rules: list[LabRule] = [PlateletsLow(protocol.rules.platelets_low), BilirubinHigh(protocol.rules.bilirubin_high)]
    spec = protocol.rules.ctcae_grade3plus
    rules += [CtcaeGrade3Plus(analyte, term, spec) for analyte, term in sorted(protocol.ctcae.items())]
    return rules


def baseline_of(state: SubjectState, analyte: str) -> LabResult | None:
    """The analyte's last result at or before the second-line start (None before a start is known)."""
    starts = state.second_line_starts
    if not starts:
        return None
    start = min(s.at for s in starts)
    before = [r for r in state.labs.values() if r.analyte == analyte and r.at <= start]
    return max(before, key=lambda r: (r.at, r.seq), default=None)


def record_result(state: SubjectState, lab: Lab, protocol: Protocol) -> str:
    """Store the lab's version of its result (or drop a cancelled one); returns the result id."""
    rid = lab.result_key
    if lab.status == "cancelled":
        state.labs.pop(rid, None)
        return rid
    default = protocol.reference_ranges[lab.analyte]
    # A range no laboratory could report (a ULN of 1e-30) is set aside, not
    # refused: the value itself can still be graded, and a grade-4 count must
    # not wait for the site to fix its range.
    site_range = plausible_reference_range(lab.analyte, lab.ref_low, lab.ref_high, lab.unit)
    if lab.ref_high is not None and site_range:
        uln = to_canonical(lab.analyte, lab.ref_high, lab.unit)
        origin: Any = "site"
    else:
        uln = default.high
        origin = "protocol_default" if site_range else "protocol_default_implausible_site_range"
    lln = default.low
    if lab.ref_low is not None and site_range:
        lln = to_canonical(lab.analyte, lab.ref_low, lab.unit)
    state.labs[rid] = LabResult(
        analyte=lab.analyte,
        value=to_canonical(lab.analyte, lab.value, lab.unit),
        unit=CANONICAL_UNIT[lab.analyte],
        value_as_sent=lab.value,
        unit_as_sent=lab.unit,
        uln=uln,
        uln_origin=origin,
        lln=lln,
        at=lab.occurred_at,
        seq=state.seq,
        status=lab.status,
        event_id=lab.event_id,
    )
    return rid


def _evidence(
    rule: LabRule, result: LabResult | None, breach: Breach | None, lab: Lab, protocol: Protocol, **extra: Any
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_ids": [lab.event_id],
        "analyte": rule.analyte,
        "result_id": lab.result_key,
        "result_status": lab.status,
        "protocol_version": protocol.version,
        "ctcae_version": protocol.ctcae_version,
        "parameters": rule.parameters(),
    }
    if result is not None:
        ev.update(
            value=float(result.value),
            unit=result.unit,
            value_as_sent=result.value_as_sent,
            unit_as_sent=result.unit_as_sent,
            uln=float(result.uln),
            uln_origin=result.uln_origin,
            times_uln=float(round(result.value / result.uln, 3)),
        )
        if result.uln_origin == "protocol_default":
            ev["uln_note"] = "no ref_high on the result: the protocol's default ULN was used"
        elif result.uln_origin == "protocol_default_implausible_site_range":
            ev["uln_note"] = (
                "the result's reference range is outside what a laboratory reports for this analyte "
                "(schemas/units.json): set aside, the protocol's default range was used"
            )
    if breach is not None:
        ev["threshold"] = breach.threshold
        ev["threshold_value"] = float(breach.threshold_value)
    ev.update(extra)
    return ev


def _label(rule: LabRule, result: LabResult) -> str:
    return f"{ANALYTE_NAMES[rule.analyte]} {_fmt(result.value)} {DISPLAY_UNIT.get(result.unit, result.unit)}"


def evaluate(rule: LabRule, book: AlertBook, lab: Lab, changed: str, protocol: Protocol) -> None:
    """Bring the rule's alert for this analyte in line with the subject's current results.

    The newest result (by clinical time) decides whether the alert is firing.
    A late result that breached in the past, with no alert covering that time,
    opens and at once resolves an alert: the DSMB still learns of the episode.
    """
    state = book.state
    results = {rid: r for rid, r in state.labs.items() if r.analyte == rule.analyte}
    baseline = baseline_of(state, rule.analyte)
    breaches = {rid: b for rid, r in results.items() if (b := rule.assess(r, baseline)) is not None}
    basis: dict[str, Any] = {
        "baseline": None
        if baseline is None
        else {
            "value": float(baseline.value),
            "at": baseline.at.isoformat(),
            "event_id": baseline.event_id,
            "abnormal": baseline.value > baseline.uln,
        }
    }
    latest_id = max(results, key=lambda rid: (results[rid].at, results[rid].seq), default=None)
    latest = results[latest_id] if latest_id is not None else None
    key = rule.analyte
    changed_result = results.get(changed)
    changed_breach = breaches.get(changed)
    rec = book.open_record(rule.rule, key)

    if rec is not None:
        rec.support = [rid for rid in rec.support if rid in breaches]
        if changed_breach is not None and changed not in rec.support and changed_result is not None:
            rec.support.append(changed)
        if not rec.support or latest_id not in breaches:
            why = (
                "the results it rested on were cancelled or corrected"
                if not rec.support
                else "a later result no longer breaches"
            )
            shown = latest if latest_id not in breaches else None
            book.resolve(
                rec,
                ended_at=latest.at if latest is not None else rec.started_at,
                evidence=_evidence(rule, shown, None, lab, protocol, resolved_because=why, **basis),
                summary=f"Resolved: {rule.rule}, {why}"
                + (f" (latest: {_label(rule, shown)})" if shown is not None else ""),
            )
            return
        worst_id = max(rec.support, key=lambda rid: _rank(breaches[rid]))
        worst = breaches[worst_id]
        book.escalate(
            rec,
            severity=worst.severity,
            ctcae_grade=worst.ctcae_grade,
            evidence=_evidence(rule, results[worst_id], worst, lab, protocol, **basis),
            summary=f"Escalated: {_label(rule, results[worst_id])} {worst.threshold} (CTCAE grade {worst.ctcae_grade})",
        )
        return

    if latest_id is not None and latest_id in breaches:
        assert latest is not None
        support = [latest_id]
        if changed_breach is not None and changed != latest_id:
            support.append(changed)
        worst_id = max(support, key=lambda rid: _rank(breaches[rid]))
        worst = breaches[worst_id]
        book.open(
            rule=rule.rule,
            key=key,
            opening_event_id=lab.event_id,
            severity=worst.severity,
            ctcae_grade=worst.ctcae_grade,
            started_at=min(results[rid].at for rid in support),
            support=support,
            evidence=_evidence(rule, results[worst_id], worst, lab, protocol, **basis),
            summary=f"{_label(rule, results[worst_id])} {worst.threshold} (CTCAE grade {worst.ctcae_grade})",
        )
        return

    if (
        changed_breach is not None
        and changed_result is not None
        and latest is not None
        and not book.covered_by_closed_episode(rule.rule, key, changed_result.at)
    ):
        rec = book.open(
            rule=rule.rule,
            key=key,
            opening_event_id=lab.event_id,
            severity=changed_breach.severity,
            ctcae_grade=changed_breach.ctcae_grade,
            started_at=changed_result.at,
            support=[changed],
            evidence=_evidence(rule, changed_result, changed_breach, lab, protocol, late_result=True, **basis),
            summary=(
                f"{_label(rule, changed_result)} {changed_breach.threshold} "
                f"(CTCAE grade {changed_breach.ctcae_grade}), reported after a later normal result"
            ),
        )
        book.resolve(
            rec,
            ended_at=latest.at,
            evidence=_evidence(
                rule, latest, None, lab, protocol, resolved_because="a later result no longer breaches", **basis
            ),
            summary=f"Resolved: {_label(rule, latest)}, the later result no longer breaches",
        )


def _rank(breach: Breach) -> int:
    return breach.ctcae_grade
