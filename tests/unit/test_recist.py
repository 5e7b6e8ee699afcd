"""RECIST 1.1 (Eisenhauer, EJC 2009) time-point responses and `recist.progression`, at their boundaries.

Sum of target diameters (short axis for lymph nodes); PR is a decrease of at
least 30% from the baseline sum; PD an increase of at least 20% and at least
5 mm over the nadir (smallest sum so far, baseline included), a new lesion,
or unequivocal progression of a non-target lesion; CR all non-nodal targets
gone and every target node under 10 mm. One info alert per progressive
follow-up scan, keyed by the scan.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.contract import SCANS, AlertMessage, InputEvent
from trialwatch.decode import Rejection, decode

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EngineRun

CST = timezone(timedelta(hours=8))
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=CST)
RULE = "recist.progression"
SUBJECT = "TW-001"

Lesion = dict[str, Any]

_scan_numbers = itertools.count(1)


def target(lesion_id: str, mm: float, *, node: bool = False, organ: str = "liver") -> Lesion:
    """A target lesion: longest diameter, or short axis when `node`."""
    return {"lesion_id": lesion_id, "organ": organ, "role": "target", "diameter_mm": mm, "lymph_node": node}


def non_target(lesion_id: str, *, mm: float | None = None, progression: bool = False, organ: str = "bone") -> Lesion:
    lesion: Lesion = {"lesion_id": lesion_id, "organ": organ, "role": "non_target"}
    if mm is not None:
        lesion["diameter_mm"] = mm
    if progression:
        lesion["unequivocal_progression"] = True
    return lesion


def new(lesion_id: str, *, mm: float | None = 12.0, organ: str = "lung") -> Lesion:
    lesion: Lesion = {"lesion_id": lesion_id, "organ": organ, "role": "new"}
    if mm is not None:
        lesion["diameter_mm"] = mm
    return lesion


def scan(
    timepoint: str, lesions: list[Lesion], *, day: float, scan_id: str | None = None, event_id: str | None = None
) -> InputEvent:
    """A valid `trial.scans.v1` event `day` days after T0 (2025-03-01T08:00+08:00)."""
    number = next(_scan_numbers)
    body: dict[str, Any] = {
        "event_id": event_id or f"scan-{number:04d}",
        "subject_id": SUBJECT,
        "site_id": "SITE-GZ",
        "occurred_at": (T0 + timedelta(days=day)).isoformat(),
        "scan_id": scan_id or f"S-{number:04d}",
        "timepoint": timepoint,
        "modality": "CT",
        "lesions": lesions,
    }
    result = decode(SCANS, json.dumps(body).encode())
    if isinstance(result, Rejection):
        raise AssertionError(f"the test built an invalid scan {body}: {result.reason}: {result.detail}")
    return result


def baseline(lesions: list[Lesion], **kw: Any) -> InputEvent:
    return scan("baseline", lesions, day=kw.pop("day", 0), **kw)


def follow_up(lesions: list[Lesion], *, day: float, **kw: Any) -> InputEvent:
    return scan("follow_up", lesions, day=day, **kw)


def targets(*mm: float) -> list[Lesion]:
    """Target lesions T1, T2, ... with the given diameters (non-nodal, one per organ)."""
    return [target(f"T{i}", v, organ=f"organ-{i}") for i, v in enumerate(mm, start=1)]


def overall(run: EngineRun) -> list[str]:
    return [r.overall for r in run.states[SUBJECT].responses]


def progression(alerts: list[AlertMessage]) -> list[AlertMessage]:
    return [a for a in alerts if a.rule == RULE]


class TestTargetSumBoundaries:
    """PR at a 30% decrease from baseline (not 29.9%); PD at +20% and +5 mm over the nadir, both needed."""

    @pytest.mark.parametrize(
        ("baseline_mm", "follow_up_mm", "expected"),
        [
            # Baseline sum 100 mm (60 + 40).
            pytest.param([60.0, 40.0], [42.0, 28.0], ("PR", 70), id="exactly-30pct-decrease-PR"),
            pytest.param([60.0, 40.0], [42.1, 28.0], ("SD", 70.1), id="29.9pct-decrease-SD"),
            pytest.param([60.0, 40.0], [30.0, 20.0], ("PR", 50), id="50pct-decrease-PR"),
            pytest.param([60.0, 40.0], [60.0, 40.0], ("SD", 100), id="unchanged-SD"),
            pytest.param([60.0, 40.0], [72.0, 48.0], ("PD", 120), id="exactly-20pct-and-20mm-PD"),
            pytest.param([60.0, 40.0], [71.9, 48.0], ("SD", 119.9), id="19.9pct-increase-SD"),
            pytest.param([60.0, 40.0], [65.0, 45.0], ("SD", 110), id="10mm-but-10pct-SD"),
            # Small sums: 20% of 20 mm is 4 mm, short of the 5 mm floor.
            pytest.param([20.0], [24.0], ("SD", 24), id="20pct-but-4mm-SD"),
            pytest.param([20.0], [24.9], ("SD", 24.9), id="24.5pct-but-4.9mm-SD"),
            pytest.param([20.0], [25.0], ("PD", 25), id="25pct-and-5mm-PD"),
            # Baseline 25 mm: +20% is exactly +5 mm.
            pytest.param([25.0], [30.0], ("PD", 30), id="exactly-20pct-and-exactly-5mm-PD"),
            pytest.param([25.0], [29.9], ("SD", 29.9), id="19.6pct-and-4.9mm-SD"),
            # Target lesions that disappear are recorded as 0 mm.
            pytest.param([60.0, 40.0], [0.0, 30.0], ("PR", 30), id="one-target-gone-PR"),
        ],
    )
    def test_target_response(
        self,
        run: EngineRun,
        baseline_mm: list[float],
        follow_up_mm: list[float],
        expected: tuple[str, float],
    ) -> None:
        run.apply_all([baseline(targets(*baseline_mm)), follow_up(targets(*follow_up_mm), day=42)])
        (response,) = run.states[SUBJECT].responses
        actual = (response.overall, None if response.sum_mm is None else float(response.sum_mm))
        assert expected == actual


class TestNadir:
    """PD is measured from the smallest sum so far (baseline included), PR always from the baseline."""

    @pytest.mark.parametrize(
        ("sums", "expected"),
        [
            # Baseline 100; the nadir after a PR of 60 makes 72 (+20%, +12 mm) progressive.
            pytest.param([100.0, 60.0, 72.0], ["PR", "PD"], id="PR-60-then-72-PD"),
            # 71.9 is +19.8% over the nadir (not PD) and -28.1% from the baseline (not PR).
            pytest.param([100.0, 60.0, 71.9], ["PR", "SD"], id="PR-60-then-71.9-SD"),
            # Nadir 80 after an SD: 96 is +20% over it, -4% from the baseline.
            pytest.param([100.0, 80.0, 96.0], ["SD", "PD"], id="SD-80-then-96-PD"),
            pytest.param([100.0, 80.0, 95.9], ["SD", "SD"], id="SD-80-then-95.9-SD"),
            # The baseline is the nadir when nothing was smaller: 120 over 100, not 110.
            pytest.param([100.0, 110.0, 120.0], ["SD", "PD"], id="nadir-stays-at-baseline"),
            pytest.param([100.0, 110.0, 119.9], ["SD", "SD"], id="nadir-stays-at-baseline-119.9"),
            # PR is against the baseline, never the nadir: 65 after 40 is -35% from 100.
            pytest.param([100.0, 40.0, 47.9, 65.0], ["PR", "PR", "PD"], id="PR-vs-baseline-PD-vs-nadir"),
            pytest.param([100.0, 40.0, 48.0], ["PR", "PD"], id="PD-while-still-52pct-below-baseline"),
        ],
    )
    def test_nadir(self, run: EngineRun, sums: list[float], expected: list[str]) -> None:
        events = [baseline(targets(sums[0]))]
        events += [follow_up(targets(s), day=42 * i) for i, s in enumerate(sums[1:], start=1)]
        run.apply_all(events)
        actual = overall(run)
        assert expected == actual


class TestLymphNodes:
    """A target node counts with its short axis; CR needs non-nodal targets at 0 mm and every node under 10 mm."""

    @pytest.mark.parametrize(
        ("liver", "node", "baseline_non_target", "follow_up_non_target", "expected"),
        [
            # Baseline: liver 30 + node short axis 20 = 50 mm.
            pytest.param(30.0, 14.0, None, None, ("SD", 44), id="node-14-sum-44-SD"),
            pytest.param(21.0, 14.0, None, None, ("PR", 35), id="node-14-sum-35-exactly-30pct-PR"),
            pytest.param(30.0, 29.0, None, None, ("SD", 59), id="node-29-sum-59-SD"),
            pytest.param(30.0, 30.0, None, None, ("PD", 60), id="node-30-sum-60-PD"),
            pytest.param(0.0, 9.9, None, None, ("CR", 9.9), id="liver-0-node-9.9-CR-sum-above-0"),
            pytest.param(0.0, 0.0, None, None, ("CR", 0), id="all-0-CR"),
            pytest.param(0.0, 10.0, None, None, ("PR", 10), id="node-exactly-10-not-CR"),
            pytest.param(1.0, 5.0, None, None, ("PR", 6), id="liver-1mm-not-CR"),
            pytest.param(0.0, 9.0, 25.0, 0.0, ("CR", 9), id="non-target-gone-CR"),
            pytest.param(0.0, 9.0, 25.0, 15.0, ("PR", 9), id="non-target-present-PR"),
            # A non-target reported without a measurement is still there (0 mm means it has disappeared).
            pytest.param(0.0, 9.0, 25.0, "unmeasured", ("PR", 9), id="non-target-unmeasured-PR"),
            # A non-measurable non-target (e.g. a bone metastasis) reported at both scans: still present.
            pytest.param(0.0, 9.0, "unmeasured", "unmeasured", ("PR", 9), id="non-measurable-non-target-PR"),
            pytest.param(0.0, 9.0, 25.0, None, ("PR", 9), id="non-target-not-evaluated-PR"),
        ],
    )
    def test_node(
        self,
        run: EngineRun,
        liver: float,
        node: float,
        baseline_non_target: float | str | None,
        follow_up_non_target: float | str | None,
        expected: tuple[str, float],
    ) -> None:
        base = [target("T1", 30.0), target("N1", 20.0, node=True, organ="lymph node")]
        if baseline_non_target == "unmeasured":
            base.append(non_target("NT1"))
        elif isinstance(baseline_non_target, float):
            base.append(non_target("NT1", mm=baseline_non_target))
        later = [target("T1", liver), target("N1", node, node=True, organ="lymph node")]
        if follow_up_non_target == "unmeasured":
            later.append(non_target("NT1"))
        elif isinstance(follow_up_non_target, float):
            later.append(non_target("NT1", mm=follow_up_non_target))
        run.apply_all([baseline(base), follow_up(later, day=42)])
        (response,) = run.states[SUBJECT].responses
        actual = (response.overall, None if response.sum_mm is None else float(response.sum_mm))
        assert expected == actual


class TestOtherProgression:
    """A new lesion or an unequivocally progressing non-target lesion is PD whatever the target sum."""

    @pytest.mark.parametrize(
        ("lesions", "expected"),
        [
            pytest.param([*targets(60.0, 40.0), non_target("NT1"), new("NEW1")], "PD", id="new-lesion-SD-sum"),
            pytest.param([*targets(30.0, 20.0), non_target("NT1"), new("NEW1")], "PD", id="new-lesion-PR-sum"),
            pytest.param([*targets(0.0, 0.0), non_target("NT1", mm=0.0), new("NEW1")], "PD", id="new-lesion-CR-sum"),
            pytest.param(
                [*targets(60.0, 40.0), non_target("NT1"), new("NEW1", mm=None)], "PD", id="new-lesion-unmeasured"
            ),
            pytest.param(
                [*targets(60.0, 40.0), non_target("NT1", progression=True)], "PD", id="non-target-progression"
            ),
            pytest.param(
                [*targets(30.0, 20.0), non_target("NT1", progression=True)], "PD", id="non-target-progression-PR-sum"
            ),
            pytest.param([*targets(60.0, 40.0), non_target("NT1")], "SD", id="neither-SD"),
        ],
    )
    def test_progression(self, run: EngineRun, lesions: list[Lesion], expected: str) -> None:
        alerts = run.apply_all([baseline([*targets(60.0, 40.0), non_target("NT1")]), follow_up(lesions, day=42)])
        actual = (overall(run), len(progression(alerts)))
        expected_alerts = 1 if expected == "PD" else 0
        assert ([expected], expected_alerts) == actual


class TestNotEvaluable:
    """A baseline target missing from a follow-up makes the time point NE, unless something else is PD."""

    @pytest.mark.parametrize(
        ("lesions", "expected"),
        [
            pytest.param(targets(30.0), "NE", id="second-target-missing-NE"),
            pytest.param([target("T2", 20.0, organ="organ-2")], "NE", id="first-target-missing-NE"),
            pytest.param([], "NE", id="no-lesions-NE"),
            pytest.param([*targets(30.0), new("NEW1")], "PD", id="missing-target-with-new-lesion-PD"),
            pytest.param(
                [*targets(30.0), non_target("NT1", progression=True)], "PD", id="missing-target-with-NT-progression-PD"
            ),
        ],
    )
    def test_missing_target(self, run: EngineRun, lesions: list[Lesion], expected: str) -> None:
        run.apply_all([baseline([*targets(60.0, 40.0), non_target("NT1")]), follow_up(lesions, day=42)])
        actual = overall(run)
        assert [expected] == actual

    def test_ne_does_not_move_the_nadir(self, run: EngineRun) -> None:
        run.apply_all(
            [
                baseline(targets(60.0, 40.0)),
                follow_up(targets(10.0), day=42),
                # 110 mm: SD against the baseline nadir 100; PD if the NE scan's 10 mm had become the nadir.
                follow_up(targets(60.0, 50.0), day=84),
            ]
        )
        expected = ["NE", "SD"]
        actual = overall(run)
        assert expected == actual


class TestBestOverallResponse:
    """The best response up to the first progression, and the clinical time of that progression."""

    @pytest.mark.parametrize(
        ("sums", "expected_responses", "expected_best", "expected_progression_scan"),
        [
            pytest.param([60.0, 75.0, 0.0], ["PR", "PD", "CR"], "PR", 2, id="PR-PD-then-CR-not-counted"),
            pytest.param([90.0, 65.0], ["SD", "PR"], "PR", None, id="SD-then-PR"),
            pytest.param([60.0, 0.0], ["PR", "CR"], "CR", None, id="PR-then-CR"),
            pytest.param([90.0, 120.0], ["SD", "PD"], "SD", 2, id="SD-then-PD"),
            pytest.param([125.0, 130.0], ["PD", "PD"], "PD", 1, id="PD-first-scan"),
        ],
    )
    def test_best_overall_response(
        self,
        run: EngineRun,
        sums: list[float],
        expected_responses: list[str],
        expected_best: str,
        expected_progression_scan: int | None,
    ) -> None:
        follow_ups = [follow_up(targets(s), day=42 * i) for i, s in enumerate(sums, start=1)]
        run.apply_all([baseline(targets(100.0)), *follow_ups])
        state = run.states[SUBJECT]
        expected_at = (
            follow_ups[expected_progression_scan - 1].occurred_at if expected_progression_scan is not None else None
        )
        expected = (expected_responses, expected_best, expected_at)
        actual = (overall(run), state.best_overall_response, state.progression_at)
        assert expected == actual

    def test_no_follow_up_no_response(self, run: EngineRun) -> None:
        run.apply_all([baseline(targets(100.0))])
        state = run.states[SUBJECT]
        expected: tuple[list[Any], None, None] = ([], None, None)
        actual = (state.responses, state.best_overall_response, state.progression_at)
        assert expected == actual


class TestClinicalOrder:
    """Scans are assessed in clinical order, whatever order they arrive in."""

    def test_follow_up_arriving_out_of_order(self, run: EngineRun) -> None:
        base = baseline(targets(100.0))
        early = follow_up(targets(60.0), day=42, scan_id="FU-1")
        late = follow_up(targets(75.0), day=84, scan_id="FU-2")
        per_event = [progression(run.apply(e)) for e in (base, late, early)]
        # Alone, FU-2 (75 mm) is SD against the baseline; once FU-1 (60 mm, PR) is known it is PD over that nadir.
        expected_counts = [0, 0, 1]
        assert expected_counts == [len(a) for a in per_event]
        (alert,) = per_event[2]
        expected = ("FU-2", late.occurred_at, "info")
        actual = (alert.evidence["scan_id"], alert.occurred_at, alert.severity)
        assert expected == actual
        state = run.states[SUBJECT]
        expected_state = (["FU-1", "FU-2"], ["PR", "PD"], "PR", late.occurred_at)
        actual_state = (
            [r.scan_id for r in state.responses],
            overall(run),
            state.best_overall_response,
            state.progression_at,
        )
        assert expected_state == actual_state

    def test_baseline_arriving_after_the_follow_up(self, run: EngineRun) -> None:
        fu = follow_up([*targets(60.0), new("NEW1")], day=42, scan_id="FU-1")
        per_event = [progression(run.apply(e)) for e in (fu, baseline(targets(60.0)))]
        expected: tuple[list[AlertMessage], list[str]] = ([], ["FU-1"])
        actual = (per_event[0], [a.evidence["scan_id"] for a in per_event[1]])
        assert expected == actual


class TestProgressionAlerts:
    """One `recist.progression` (info) per progressive follow-up scan, none for CR/PR/SD/NE, none on re-sending."""

    def test_one_alert_per_pd_scan(self, run: EngineRun) -> None:
        events = [
            baseline(targets(100.0)),
            follow_up(targets(90.0), day=42, scan_id="FU-1"),
            follow_up(targets(120.0), day=84, scan_id="FU-2"),
            follow_up([*targets(120.0), new("NEW1")], day=126, scan_id="FU-3"),
            follow_up(targets(60.0), day=168, scan_id="FU-4"),
        ]
        alerts = progression(run.apply_all(events))
        expected = [("FU-2", "info", "firing", 1), ("FU-3", "info", "firing", 1)]
        actual = [(a.evidence["scan_id"], a.severity, a.status, a.revision) for a in alerts]
        assert expected == actual
        expected_distinct = 2
        assert expected_distinct == len({a.alert_id for a in alerts})

    @pytest.mark.parametrize(
        "follow_up_mm",
        [
            pytest.param([0.0], id="CR"),
            pytest.param([60.0], id="PR"),
            pytest.param([100.0], id="SD"),
            pytest.param([119.9], id="SD-just-under-PD"),
        ],
    )
    def test_no_alert_without_pd(self, apply_all: ApplyAll, follow_up_mm: list[float]) -> None:
        alerts = apply_all([baseline(targets(100.0)), follow_up(targets(*follow_up_mm), day=42)])
        expected: list[AlertMessage] = []
        assert expected == progression(alerts)

    def test_no_alert_for_a_baseline_scan(self, apply_all: ApplyAll) -> None:
        alerts = apply_all([baseline([*targets(100.0), non_target("NT1", progression=True), new("NEW1")])])
        expected: list[AlertMessage] = []
        assert expected == progression(alerts)

    def test_same_event_resent(self, run: EngineRun) -> None:
        pd = follow_up(targets(130.0), day=42, scan_id="FU-1")
        run.apply(baseline(targets(100.0)))
        first, again = run.apply(pd), run.apply(pd)
        expected = (1, 0)
        assert expected == (len(progression(first)), len(progression(again)))

    def test_same_scan_resent_with_a_new_event_id(self, run: EngineRun) -> None:
        run.apply(baseline(targets(100.0)))
        first = run.apply(follow_up(targets(130.0), day=42, scan_id="FU-1"))
        again = run.apply(follow_up(targets(130.0), day=42, scan_id="FU-1"))
        expected = (1, 0)
        assert expected == (len(progression(first)), len(progression(again)))

    def test_a_later_scan_does_not_repeat_an_earlier_alert(self, run: EngineRun) -> None:
        run.apply(baseline(targets(100.0)))
        first = run.apply(follow_up(targets(130.0), day=42, scan_id="FU-1"))
        later = run.apply(follow_up(targets(110.0), day=84, scan_id="FU-2"))
        expected: tuple[list[str], list[AlertMessage]] = (["FU-1"], [])
        actual = ([a.evidence["scan_id"] for a in progression(first)], progression(later))
        assert expected == actual

    def test_alert_time_is_the_scan_time(self, run: EngineRun) -> None:
        run.apply(baseline(targets(100.0)))
        pd = follow_up([*targets(100.0), new("NEW1")], day=42, scan_id="FU-1")
        (alert,) = progression(run.apply(pd))
        expected = (pd.occurred_at, SUBJECT, ["NEW1"])
        actual = (alert.occurred_at, alert.subject_id, alert.evidence["new_lesions"])
        assert expected == actual
