"""RECIST 1.1 from lesion measurements: time-point responses, best overall response, progression."""

from __future__ import annotations

from decimal import Decimal

from trialwatch.contract import Scan
from trialwatch.engine import retention
from trialwatch.engine.lifecycle import AlertBook
from trialwatch.engine.state import ScanRecord, SubjectState, TimepointResponse
from trialwatch.protocol import Protocol, RecistRule

# Best response order for the best overall response (NE: not evaluable).
_RANK = {"CR": 4, "PR": 3, "SD": 2, "PD": 1, "NE": 0}


def already_applied(state: SubjectState, scan: Scan) -> bool:
    """The event is the scan's current version (a re-send)."""
    current = state.scans.get(scan.scan_id)
    return current is not None and current.event_id == scan.event_id


def _forget_oldest_follow_up(state: SubjectState) -> None:
    """Past SCANS_KEPT scans, the oldest follow-up goes (RECIST reads from the latest baseline on)."""
    follow_ups = [s for s in state.scans.values() if s.timepoint != "baseline"]
    baselines = [s for s in state.scans.values() if s.timepoint == "baseline"]
    latest_baseline = max(baselines, key=lambda s: (s.at, s.seq), default=None)
    older_baselines = [s for s in baselines if s is not latest_baseline]
    oldest = min(older_baselines or follow_ups, key=lambda s: (s.at, s.seq))
    del state.scans[oldest.scan_id]


def record_scan(state: SubjectState, scan: Scan) -> None:
    targets = {les.lesion_id: Decimal(repr(les.diameter_mm or 0.0)) for les in scan.lesions if les.role == "target"}
    non_targets = [les for les in scan.lesions if les.role == "non_target"]
    state.scans[scan.scan_id] = ScanRecord(
        scan_id=scan.scan_id,
        event_id=scan.event_id,
        at=scan.occurred_at,
        seq=state.seq,
        timepoint=scan.timepoint,
        targets=targets,
        target_nodes=[les.lesion_id for les in scan.lesions if les.role == "target" and les.lymph_node],
        non_target_progression=any(les.unequivocal_progression for les in non_targets),
        non_targets=[les.lesion_id for les in non_targets],
        # Only an explicit 0 means gone: a non-target reported without a
        # diameter (a bone metastasis, say) is present, not resolved.
        non_targets_gone=[les.lesion_id for les in non_targets if les.diameter_mm == 0],
        new_lesions=[les.lesion_id for les in scan.lesions if les.role == "new"],
    )
    while len(state.scans) > retention.SCANS_KEPT:
        _forget_oldest_follow_up(state)


def _target_response(
    scan: ScanRecord, baseline: ScanRecord, nadir: Decimal, spec: RecistRule
) -> tuple[str, Decimal | None]:
    # Every baseline target must be measured again, or the target response is not evaluable.
    if set(baseline.targets) - set(scan.targets):
        return "NE", None
    total = sum((scan.targets[lid] for lid in baseline.targets), Decimal(0))
    if total >= nadir * (1 + spec.pd_min_increase_fraction) and total - nadir >= spec.pd_min_increase_mm:
        return "PD", total
    nodes = set(baseline.target_nodes)
    if all(
        (scan.targets[lid] < spec.node_normal_below_mm) if lid in nodes else scan.targets[lid] == 0
        for lid in baseline.targets
    ):
        return "CR", total
    baseline_sum = sum(baseline.targets.values(), Decimal(0))
    if total <= baseline_sum * (1 - spec.pr_min_decrease_fraction):
        return "PR", total
    return "SD", total


def _overall(target: str, non_target: str, new: bool) -> str:
    if new or target == "PD" or non_target == "PD":
        return "PD"
    if target == "NE":
        return "NE"
    if target == "CR":
        return "CR" if non_target == "CR" else "PR"
    return target


def assess(state: SubjectState, spec: RecistRule) -> None:
    """Recompute every follow-up's time-point response against the baseline and the running nadir."""
    scans = sorted(state.scans.values(), key=lambda s: (s.at, s.seq))
    baselines = [s for s in scans if s.timepoint == "baseline"]
    state.responses = []
    state.best_overall_response = None
    state.progression_at = None
    if not baselines:
        return
    baseline = baselines[-1]
    nadir = sum(baseline.targets.values(), Decimal(0))
    for scan in scans:
        if scan.timepoint != "follow_up" or scan.at < baseline.at:
            continue
        target, total = _target_response(scan, baseline, nadir, spec)
        if scan.non_target_progression:
            non_target = "PD"
        elif not set(baseline.non_targets) <= set(scan.non_targets):
            non_target = "NOT_ALL_EVALUATED"
        elif set(baseline.non_targets) <= set(scan.non_targets_gone):
            non_target = "CR"  # all gone, or there were none
        else:
            non_target = "NON_CR_NON_PD"
        overall = _overall(target, non_target, bool(scan.new_lesions))
        state.responses.append(
            TimepointResponse(
                scan_id=scan.scan_id,
                at=scan.at,
                sum_mm=total,
                target=target,
                non_target=non_target,
                new_lesions=bool(scan.new_lesions),
                overall=overall,
            )
        )
        if total is not None:
            nadir = min(nadir, total)
        if overall == "PD" and state.progression_at is None:
            state.progression_at = scan.at
    if state.responses:
        # Best response before (and including) the first progression.
        upto = [r for r in state.responses if state.progression_at is None or r.at <= state.progression_at]
        state.best_overall_response = max(upto, key=lambda r: _RANK[r.overall]).overall


def evaluate(book: AlertBook, scan: Scan, protocol: Protocol) -> None:
    """`recist.progression` once per progressive follow-up scan."""
    spec = protocol.rules.recist
    state = book.state
    assess(state, spec)
    for response in state.responses:
        if response.overall != "PD" or f"recist.progression|{response.scan_id}" in state.alerts:
            continue
        record = state.scans[response.scan_id]
        baseline = max((s for s in state.scans.values() if s.timepoint == "baseline"), key=lambda s: (s.at, s.seq))
        reasons = []
        if response.target == "PD":
            reasons.append(f"sum of diameters {response.sum_mm} mm, >= 20% and >= 5 mm over the nadir")
        if response.non_target == "PD":
            reasons.append("unequivocal progression of a non-target lesion")
        if response.new_lesions:
            reasons.append(f"new lesion(s): {', '.join(record.new_lesions)}")
        book.open(
            rule="recist.progression",
            key=response.scan_id,
            opening_event_id=record.event_id,
            severity=spec.severity,
            started_at=record.at,
            occurred_at=record.at,
            evidence={
                "event_ids": [baseline.event_id, record.event_id],
                "scan_id": response.scan_id,
                "sum_mm": float(response.sum_mm) if response.sum_mm is not None else None,
                "baseline_sum_mm": float(sum(baseline.targets.values(), Decimal(0))),
                "target_response": response.target,
                "non_target_response": response.non_target,
                "new_lesions": record.new_lesions,
                "time_point_response": response.overall,
                "best_overall_response": state.best_overall_response,
                "first_progression_at": state.progression_at.isoformat() if state.progression_at else None,
                "protocol_version": protocol.version,
            },
            summary=f"RECIST 1.1 progressive disease on scan {response.scan_id}: " + "; ".join(reasons),
        )
