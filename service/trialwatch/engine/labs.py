"""Lab rules: `lab.platelets.low` and `lab.bilirubin.high`, one alert per subject, rule and analyte."""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from typing import Protocol as TypingProtocol

from trialwatch.contract import SEVERITY_RANK, Lab, Severity
from trialwatch.engine import retention
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.retention import fingerprint_int
from trialwatch.engine.state import LabResult, SubjectState
from trialwatch.protocol import AeGradeRule, BilirubinRule, CtcaeTerm, GradeCriterion, PlateletsRule, Protocol
from trialwatch.units import ANALYTE_NAMES, DISPLAY_UNIT, plausible_reference_range, to_canonical


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


_ONE = Decimal(1)
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
        references = {
            "abs": _ONE,
            "lln": result.lln,
            "uln": result.uln,
            "bl": baseline.value if baseline is not None else None,
        }
        best: tuple[int, GradeCriterion] | None = None
        for criterion in criteria:
            reference = references[criterion.of]
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


# What the lab rules read of the past (retention.py keeps it; the rest is forgotten):
# per analyte the newest results (the latest decides firing), the baseline
# (the last results at or before the first second-line start: three, so a
# cancelled baseline falls back to the one before), every result an open
# alert rests on, and the closed episodes of each rule and analyte.
BASELINE_PINNED = 3
LAB_RULES = frozenset({PlateletsLow.rule, BilirubinHigh.rule, CtcaeGrade3Plus.rule})
REMEMBERS_EPISODES = LAB_RULES


def _before(results: list[LabResult], at: datetime) -> int:
    """How many of `results` (clinical-time order) are at or before `at`."""
    return bisect.bisect_right(results, at, key=lambda r: r.at)


def _up_to_start(state: SubjectState, analyte: str) -> tuple[list[LabResult], int]:
    """The analyte's results, and how many lie at or before the first second-line start (0 before one is known)."""
    starts = state.second_line_starts
    series = state.labs.get(analyte)
    if series is None:
        return [], 0
    return series.results, _before(series.results, min(s.at for s in starts)) if starts else 0


def baseline_of(state: SubjectState, analyte: str) -> LabResult | None:
    """The analyte's last result at or before the second-line start (None before a start is known)."""
    results, n = _up_to_start(state, analyte)
    return results[n - 1] if n else None


def pinned_results(state: SubjectState, analyte: str) -> list[str]:
    """Results of `analyte` the lab rules still need: the baseline candidates and open alerts' support."""
    results, n = _up_to_start(state, analyte)
    pinned = [r.result_id for r in results[max(0, n - BASELINE_PINNED) : n]]
    for rec in state.alerts.values():
        if rec.key == analyte and rec.status == "firing" and rec.rule in LAB_RULES:
            pinned += rec.support
    return pinned


def _rid_index(state: SubjectState) -> dict[str, str]:
    """result_id -> analyte of the kept results, built once per decoded state (not encoded)."""
    index: dict[str, str] | None = state.__dict__.get("_rid_index")
    if index is None:
        index = {r.result_id: analyte for analyte, series in state.labs.items() for r in series.results}
        state.__dict__["_rid_index"] = index
    return index


def current_version(state: SubjectState, rid: str) -> LabResult | None:
    """The kept current version of a result, whichever analyte it was sent as."""
    analyte = _rid_index(state).get(rid)
    series = state.labs.get(analyte) if analyte is not None else None
    if series is None:
        return None
    return next((r for r in series.results if r.result_id == rid), None)


def already_applied(state: SubjectState, lab: Lab) -> bool:
    """The event is the current or an earlier version of a kept result (a re-send)."""
    current = current_version(state, lab.result_key)
    if current is None:
        return False
    return current.event_id == lab.event_id or fingerprint_int(lab.event_id) in current.superseded


@functools.lru_cache(maxsize=4096)
def _site_range(
    analyte: str, ref_low: float | None, ref_high: float | None, unit: str
) -> tuple[Decimal | None, Decimal | None, bool]:
    """A result's reference range in the canonical unit (low, high) and whether it is plausible.

    Cached: a site sends the same range with every result of an analyte.
    """
    plausible = plausible_reference_range(analyte, ref_low, ref_high, unit)
    low = to_canonical(analyte, ref_low, unit) if ref_low is not None and plausible else None
    high = to_canonical(analyte, ref_high, unit) if ref_high is not None and plausible else None
    return low, high, plausible


def record_result(state: SubjectState, lab: Lab, protocol: Protocol, previous: LabResult | None) -> str:
    """Store the lab's version of its result (or drop a cancelled one); returns the result id.

    `previous`: the result's current version (`current_version`), which this one replaces.
    """
    rid = lab.result_key
    if previous is not None:
        state.labs[previous.analyte].results.remove(previous)
        del _rid_index(state)[rid]
    if lab.status == "cancelled":
        return rid
    default = protocol.reference_ranges[lab.analyte]
    # A range no laboratory could report (a ULN of 1e-30) is set aside, not
    # refused: the value itself can still be graded, and a grade-4 count must
    # not wait for the site to fix its range.
    low, high, site_range = _site_range(lab.analyte, lab.ref_low, lab.ref_high, lab.unit)
    uln = high if high is not None else default.high
    origin: Any = "site"
    if high is None:
        origin = "protocol_default" if site_range else "protocol_default_implausible_site_range"
    lln = low if low is not None else default.low
    superseded = [*previous.superseded, fingerprint_int(previous.event_id)][-8:] if previous is not None else []
    result = LabResult(
        result_id=rid,
        analyte=lab.analyte,
        value=to_canonical(lab.analyte, lab.value, lab.unit),
        value_as_sent=lab.value,
        unit_as_sent=lab.unit,
        uln=uln,
        uln_origin=origin,
        lln=lln,
        at=lab.occurred_at,
        seq=state.seq,
        status=lab.status,
        event_id=lab.event_id,
        superseded=superseded,
    )
    results = state.series(lab.analyte).results
    # The newest seq: after every result of the same clinical time.
    results.insert(_before(results, result.at), result)
    _rid_index(state)[rid] = lab.analyte
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


def _baseline_evidence(baseline: LabResult | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    return {
        "value": float(baseline.value),
        "at": baseline.at.isoformat(),
        "event_id": baseline.event_id,
        "abnormal": baseline.value > baseline.uln,
    }


def _label(rule: LabRule, result: LabResult) -> str:
    return f"{ANALYTE_NAMES[rule.analyte]} {_fmt(result.value)} {DISPLAY_UNIT.get(result.unit, result.unit)}"


@dataclass(frozen=True, slots=True)
class AnalyteView:
    """One analyte's kept results as the lab rules read them, built once per event for all its rules."""

    ordered: list[LabResult]  # clinical-time order
    results: dict[str, LabResult]
    baseline: LabResult | None

    @classmethod
    def of(cls, state: SubjectState, analyte: str) -> AnalyteView:
        series = state.labs.get(analyte)
        ordered = series.results if series is not None else []
        return cls(ordered, {r.result_id: r for r in ordered}, baseline_of(state, analyte))


def evaluate(rule: LabRule, book: AlertBook, lab: Lab, changed: str, protocol: Protocol, view: AnalyteView) -> None:
    """Bring the rule's alert for this analyte in line with the subject's current results.

    The newest result (by clinical time) decides whether the alert is firing.
    A late result that breached in the past, with no alert covering that time,
    opens and at once resolves an alert: the DSMB still learns of the episode.
    """
    ordered, results, baseline = view.ordered, view.results, view.baseline
    breaches = _Breaches(rule, results, baseline)

    def evidence(result: LabResult | None, breach: Breach | None, **extra: Any) -> dict[str, Any]:
        return _evidence(rule, result, breach, lab, protocol, **extra, baseline=_baseline_evidence(baseline))

    latest = ordered[-1] if ordered else None
    latest_id = latest.result_id if latest is not None else None
    key = rule.analyte
    changed_result = results.get(changed)
    changed_breach = breaches.get(changed)
    rec = book.open_record(rule.rule, key)

    if rec is not None:
        rec.support = [rid for rid in rec.support if rid in breaches]
        if changed_breach is not None and changed not in rec.support and changed_result is not None:
            rec.support.append(changed)
            # Bounded: an alert open for years rests on its newest results.
            del rec.support[: -retention.PINNED_MAX]
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
                evidence=evidence(shown, None, resolved_because=why),
                summary=f"Resolved: {rule.rule}, {why}"
                + (f" (latest: {_label(rule, shown)})" if shown is not None else ""),
            )
            return
        worst_id = max(rec.support, key=lambda rid: _rank(breaches[rid]))
        worst = breaches[worst_id]
        if SEVERITY_RANK[worst.severity] <= SEVERITY_RANK[rec.severity]:
            return  # nothing to escalate (escalate would send nothing): no evidence to build
        book.escalate(
            rec,
            severity=worst.severity,
            ctcae_grade=worst.ctcae_grade,
            evidence=evidence(results[worst_id], worst),
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
            evidence=evidence(results[worst_id], worst),
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
            evidence=evidence(changed_result, changed_breach, late_result=True),
            summary=(
                f"{_label(rule, changed_result)} {changed_breach.threshold} "
                f"(CTCAE grade {changed_breach.ctcae_grade}), reported after a later normal result"
            ),
        )
        book.resolve(
            rec,
            ended_at=latest.at,
            evidence=evidence(latest, None, resolved_because="a later result no longer breaches"),
            summary=f"Resolved: {_label(rule, latest)}, the later result no longer breaches",
        )


class _Breaches:
    """The rule's breach of each result, assessed when asked: a rule reads a few, not every kept one."""

    def __init__(self, rule: LabRule, results: dict[str, LabResult], baseline: LabResult | None) -> None:
        self.rule = rule
        self.results = results
        self.baseline = baseline
        self.memo: dict[str, Breach | None] = {}

    def get(self, rid: str | None) -> Breach | None:
        if rid is None:
            return None
        if rid not in self.memo:
            result = self.results.get(rid)
            self.memo[rid] = self.rule.assess(result, self.baseline) if result is not None else None
        return self.memo[rid]

    def __contains__(self, rid: str | None) -> bool:
        return self.get(rid) is not None

    def __getitem__(self, rid: str) -> Breach:
        breach = self.get(rid)
        if breach is None:
            raise KeyError(rid)
        return breach


def _rank(breach: Breach) -> int:
    return breach.ctcae_grade
