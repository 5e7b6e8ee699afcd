"""`rild.suspected` and `eligibility.violation`: subject-level rules over the whole state, at their boundaries.

RILD: within 90 days (inclusive) of the first SBRT fraction, the latest
in-window result of ALP above 2 × ULN or of ALT/AST above 5 × ULN; one alert
per subject, resolved when the latest in-window results no longer breach; an
arm-revealing rule, so never on the masked stream.

Eligibility (NCT06592612 inclusion criteria 1, 5, 7 and the age limits):
age 18-75, KPS >= 80, Child-Pugh <= 7, and the screening labs (latest per
analyte dated within 28 days before the enrolment, inclusive) WBC >= 3.0,
ANC >= 1.5, PLT >= 50 ×10⁹/L, Hb >= 90 g/L, albumin >= 28 g/L, bilirubin <=
1.5 × ULN, ALT/AST/ALP <= 2.5 × ULN, creatinine <= 1.5 × ULN.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.cli import main
from trialwatch.contract import LABS, TREATMENT, AlertMessage, InputEvent, MaskedAlertMessage, mask
from trialwatch.decode import Rejection, decode

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EngineRun, EventFactory

CST = timezone(timedelta(hours=8))
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=CST)
RILD = "rild.suspected"
ELIGIBILITY = "eligibility.violation"

CANONICAL = {
    "neutrophils": "10*9/L",
    "wbc": "10*9/L",
    "platelets": "10*9/L",
    "hemoglobin": "g/L",
    "albumin": "g/L",
    "total_bilirubin": "umol/L",
    "alt": "U/L",
    "ast": "U/L",
    "alp": "U/L",
    "creatinine": "umol/L",
}

_treatment_ids = itertools.count(1)


def treatment_body(kind: str, *, day: float = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": f"tx-{next(_treatment_ids):04d}",
        "subject_id": "TW-001",
        "site_id": "SITE-GZ",
        "occurred_at": (T0 + timedelta(days=day)).isoformat(),
        "kind": kind,
    }
    if kind == "sbrt_fraction":
        body.update(fraction=1, dose_gy=8.0)
    if kind == "second_line_start":
        body.update(regimen="lenvatinib")
    body.update(overrides)
    return body


def treatment(kind: str, *, day: float = 0, **overrides: Any) -> InputEvent:
    """A valid `trial.treatment.v1` event `day` days after T0 (2025-03-01T08:00+08:00)."""
    body = treatment_body(kind, day=day, **overrides)
    result = decode(TREATMENT, json.dumps(body).encode())
    if isinstance(result, Rejection):
        raise AssertionError(f"the test built an invalid treatment event {body}: {result.reason}: {result.detail}")
    return result


def fraction(*, day: float = 0, number: int = 1, **overrides: Any) -> InputEvent:
    return treatment("sbrt_fraction", day=day, fraction=number, **overrides)


def lab(make: EventFactory, analyte: str, value: float, **overrides: Any) -> InputEvent:
    """A lab result of `analyte` in its canonical unit unless `unit` is given."""
    overrides.setdefault("unit", CANONICAL[analyte])
    return make.lab(analyte=analyte, value=value, **overrides)


def of_rule(alerts: list[AlertMessage], rule: str) -> list[AlertMessage]:
    return [a for a in alerts if a.rule == rule]


def lifecycle(alerts: list[AlertMessage], rule: str) -> list[tuple[str, int, str]]:
    return [(a.alert_id, a.revision, a.status) for a in of_rule(alerts, rule)]


# --------------------------------------------------------------------------- RILD


class TestRildThresholds:
    """RILD fires strictly above 2 × ULN for ALP and 5 × ULN for ALT/AST, on the result's ULN or the default."""

    @pytest.mark.parametrize(
        ("analyte", "value", "ref_high", "expected"),
        [
            pytest.param("alp", 200.0, 100.0, [], id="alp-uln100-exactly-2x"),
            pytest.param("alp", 200.1, 100.0, [("high", "firing")], id="alp-uln100-200.1"),
            pytest.param("alp", 250.0, None, [], id="alp-default-uln125-exactly-2x"),
            pytest.param("alp", 250.1, None, [("high", "firing")], id="alp-default-uln125-250.1"),
            pytest.param("alt", 200.0, 40.0, [], id="alt-uln40-exactly-5x"),
            pytest.param("alt", 200.1, 40.0, [("high", "firing")], id="alt-uln40-200.1"),
            pytest.param("alt", 200.0, None, [], id="alt-default-uln40-exactly-5x"),
            pytest.param("alt", 200.1, None, [("high", "firing")], id="alt-default-uln40-200.1"),
            pytest.param("ast", 175.0, 35.0, [], id="ast-uln35-exactly-5x"),
            pytest.param("ast", 175.1, 35.0, [("high", "firing")], id="ast-uln35-175.1"),
            pytest.param("ast", 175.0, None, [], id="ast-default-uln35-exactly-5x"),
            pytest.param("ast", 175.1, None, [("high", "firing")], id="ast-default-uln35-175.1"),
            # ALP 4 x ULN is RILD but no transaminase-style 5 x limit applies to it.
            pytest.param("alp", 400.0, 100.0, [("high", "firing")], id="alp-4x"),
            # A transaminase at 4 x ULN is not RILD (its limit is 5 x, not ALP's 2 x).
            pytest.param("alt", 160.0, 40.0, [], id="alt-4x-not-rild"),
        ],
    )
    def test_threshold(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        analyte: str,
        value: float,
        ref_high: float | None,
        expected: list[tuple[str, str]],
    ) -> None:
        alerts = apply_all([fraction(day=0), lab(make, analyte, value, ref_high=ref_high, day=10)])
        actual = [(a.severity, a.status) for a in of_rule(alerts, RILD)]
        assert expected == actual


class TestRildWindow:
    """Only results from the first SBRT fraction to 90 days after it (inclusive) count; no fraction, no RILD."""

    @pytest.mark.parametrize(
        ("lab_offset", "expected"),
        [
            pytest.param(timedelta(hours=1), 1, id="1-hour-after-first-fraction"),
            pytest.param(timedelta(days=45), 1, id="day-45"),
            pytest.param(timedelta(days=90), 1, id="day-90-inside"),
            pytest.param(timedelta(days=91), 0, id="day-91-outside"),
            pytest.param(timedelta(days=120), 0, id="day-120-outside"),
            pytest.param(-timedelta(hours=1), 0, id="1-hour-before-first-fraction"),
            pytest.param(-timedelta(days=3), 0, id="3-days-before-first-fraction"),
        ],
    )
    def test_window(self, make: EventFactory, apply_all: ApplyAll, lab_offset: timedelta, expected: int) -> None:
        at = T0 + lab_offset
        alerts = apply_all(
            [fraction(day=0), make.lab(analyte="alp", value=300.0, unit="U/L", occurred_at=at.isoformat())]
        )
        actual = len(of_rule(alerts, RILD))
        assert expected == actual

    def test_window_counts_from_the_first_fraction_not_the_last(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            fraction(day=0, number=1),
            fraction(day=2, number=2),
            fraction(day=4, number=3),
            lab(make, "alp", 300.0, ref_high=100.0, day=92),
        ]
        expected: list[AlertMessage] = []
        actual = of_rule(apply_all(events), RILD)
        assert expected == actual

    def test_first_fraction_by_clinical_time_not_arrival(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            fraction(day=4, number=3),
            fraction(day=0, number=1),
            lab(make, "alp", 300.0, ref_high=100.0, day=-1),
            lab(make, "alp", 300.0, ref_high=100.0, day=92),
        ]
        expected: list[AlertMessage] = []
        actual = of_rule(apply_all(events), RILD)
        assert expected == actual

    def test_no_fraction_never_fires(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            make.enrollment(arm="control", day=-10),
            treatment("second_line_start", day=0),
            lab(make, "alp", 2000.0, ref_high=100.0, day=10),
            lab(make, "alt", 1000.0, ref_high=40.0, day=11),
            lab(make, "ast", 1000.0, ref_high=35.0, day=12),
        ]
        expected: list[AlertMessage] = []
        actual = of_rule(apply_all(events), RILD)
        assert expected == actual

    def test_a_fraction_arriving_after_the_lab_fires_it(self, make: EventFactory, run: EngineRun) -> None:
        lab_alerts = run.apply(lab(make, "alp", 300.0, ref_high=100.0, day=10))
        fraction_alerts = run.apply(fraction(day=0))
        expected = (0, 1)
        actual = (len(of_rule(lab_alerts, RILD)), len(of_rule(fraction_alerts, RILD)))
        assert expected == actual


class TestRildLifecycle:
    """One alert per subject; it resolves when the latest in-window result of every criterion no longer breaches."""

    def test_several_breaches_one_alert(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            fraction(day=0),
            lab(make, "alp", 300.0, ref_high=100.0, day=10),
            lab(make, "alt", 300.0, ref_high=40.0, day=11),
            lab(make, "ast", 300.0, ref_high=35.0, day=12),
            lab(make, "alp", 500.0, ref_high=100.0, day=13),
        ]
        actual = [(a.revision, a.status, a.severity) for a in of_rule(apply_all(events), RILD)]
        expected = [(1, "firing", "high")]
        assert expected == actual

    def test_resolves_when_the_latest_result_no_longer_breaches(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            fraction(day=0),
            lab(make, "alp", 300.0, ref_high=100.0, day=10),
            lab(make, "alp", 150.0, ref_high=100.0, day=20),
        ]
        actual = lifecycle(apply_all(events), RILD)
        alert_id = actual[0][0]
        expected = [(alert_id, 1, "firing"), (alert_id, 2, "resolved")]
        assert expected == actual

    def test_resolves_only_when_every_criterion_is_clear(self, make: EventFactory, run: EngineRun) -> None:
        steps = [
            fraction(day=0),
            lab(make, "alp", 300.0, ref_high=100.0, day=10),
            lab(make, "alt", 300.0, ref_high=40.0, day=11),
            lab(make, "alp", 100.0, ref_high=100.0, day=20),
            lab(make, "alt", 40.0, ref_high=40.0, day=21),
        ]
        actual = [[a.status for a in of_rule(run.apply(e), RILD)] for e in steps]
        expected = [[], ["firing"], [], [], ["resolved"]]
        assert expected == actual

    def test_a_normal_result_after_the_window_does_not_resolve(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            fraction(day=0),
            lab(make, "alp", 300.0, ref_high=100.0, day=80),
            lab(make, "alp", 100.0, ref_high=100.0, day=95),
        ]
        actual = [a.status for a in of_rule(apply_all(events), RILD)]
        expected = ["firing"]
        assert expected == actual

    def test_evidence_names_the_breach(self, make: EventFactory, apply_all: ApplyAll) -> None:
        first = fraction(day=0)
        breach = lab(make, "alt", 250.0, ref_high=40.0, day=10)
        (alert,) = of_rule(apply_all([first, breach]), RILD)
        expected = ([first.event_id, breach.event_id], ["alt"], [40.0])
        actual = (
            alert.evidence["event_ids"],
            [b["analyte"] for b in alert.evidence["breaches"]],
            [b["uln"] for b in alert.evidence["breaches"]],
        )
        assert expected == actual


class TestRildIsMasked:
    """`rild.suspected` reveals the arm: it is on the DSMB stream and never on the masked stream."""

    def test_mask_drops_it(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                make.enrollment(arm="sbrt", day=-10),
                fraction(day=0),
                lab(make, "alp", 300.0, ref_high=100.0, day=10),
                lab(make, "neutrophils", 0.8, day=10),
            ]
        )
        expected_unmasked = [RILD, "lab.ctcae.grade3plus"]
        assert expected_unmasked == [a.rule for a in alerts]
        expected_masked = ["lab.ctcae.grade3plus"]
        actual_masked = [m.rule for a in alerts if (m := mask(a)) is not None]
        assert expected_masked == actual_masked

    def test_replay_masked_drops_it(
        self, make: EventFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        lines = [
            make.line("enrollment", arm="sbrt", day=-10),
            json.dumps({"topic": TREATMENT, "value": treatment_body("sbrt_fraction", day=0)}),
            json.dumps({"topic": LABS, "value": make.body("lab", analyte="alp", value=300.0, unit="U/L", day=10)}),
        ]
        path = tmp_path / "events.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

        main(["replay", str(path)])
        unmasked = [AlertMessage.model_validate_json(line).rule for line in capsys.readouterr().out.splitlines()]
        main(["replay", str(path), "--masked"])
        masked = [MaskedAlertMessage.model_validate_json(line).rule for line in capsys.readouterr().out.splitlines()]
        expected = (True, False)
        assert expected == (RILD in unmasked, RILD in masked)


# --------------------------------------------------------------------------- eligibility


Outcome = list[tuple[str, str, list[str]]]  # status, severity, failed criteria (sorted)


def eligibility(alerts: list[AlertMessage]) -> Outcome:
    """Each eligibility message as (status, severity, failed criteria in alphabetical order)."""
    return [
        (a.status, a.severity, sorted(f["criterion"] for f in a.evidence["failures"]))
        for a in of_rule(alerts, ELIGIBILITY)
    ]


def fails(*criteria: str) -> Outcome:
    """One firing alert whose failures are `criteria` (in any order)."""
    return [("firing", "warning", sorted(criteria))]


class TestEnrolmentCriteria:
    """Age 18-75, KPS >= 80 and Child-Pugh <= 7 pass at their limits and fail just past them."""

    @pytest.mark.parametrize(
        ("overrides", "expected"),
        [
            pytest.param({}, [], id="defaults-eligible"),
            pytest.param({"age_years": 18}, [], id="age-18-ok"),
            pytest.param({"age_years": 75}, [], id="age-75-ok"),
            pytest.param({"age_years": 17}, fails("age"), id="age-17-fails"),
            pytest.param({"age_years": 76}, fails("age"), id="age-76-fails"),
            pytest.param({"kps": 80}, [], id="kps-80-ok"),
            pytest.param({"kps": 100}, [], id="kps-100-ok"),
            pytest.param({"kps": 79}, fails("kps"), id="kps-79-fails"),
            pytest.param({"child_pugh_score": 5}, [], id="child-pugh-5-ok"),
            pytest.param({"child_pugh_score": 7}, [], id="child-pugh-7-ok"),
            pytest.param({"child_pugh_score": 8}, fails("child_pugh_score"), id="child-pugh-8-fails"),
            pytest.param(
                {"age_years": 80, "kps": 60, "child_pugh_score": 10},
                fails("age", "kps", "child_pugh_score"),
                id="all-three-fail-one-alert",
            ),
        ],
    )
    def test_criterion(
        self, make: EventFactory, apply_all: ApplyAll, overrides: dict[str, Any], expected: Outcome
    ) -> None:
        actual = eligibility(apply_all([make.enrollment(**overrides)]))
        assert expected == actual


class TestScreeningLabLimits:
    """Each inclusion-7 lab passes exactly at its limit and fails just past it, in the units it comes in."""

    @pytest.mark.parametrize(
        ("analyte", "value", "unit", "ref_high", "failed"),
        [
            pytest.param("wbc", 3.0, "10*9/L", None, False, id="wbc-3.0-ok"),
            pytest.param("wbc", 2.99, "10*9/L", None, True, id="wbc-2.99-fails"),
            pytest.param("wbc", 3.0, "10*3/uL", None, False, id="wbc-10*3/uL-3.0-ok"),
            pytest.param("wbc", 2990.0, "/uL", None, True, id="wbc-per-uL-2990-fails"),
            pytest.param("neutrophils", 1.5, "10*9/L", None, False, id="anc-1.5-ok"),
            pytest.param("neutrophils", 1.49, "10*9/L", None, True, id="anc-1.49-fails"),
            pytest.param("platelets", 50.0, "10*9/L", None, False, id="plt-50-ok"),
            pytest.param("platelets", 49.9, "10*9/L", None, True, id="plt-49.9-fails"),
            pytest.param("platelets", 50.0, "10*3/uL", None, False, id="plt-10*3/uL-50-ok"),
            pytest.param("hemoglobin", 90.0, "g/L", None, False, id="hb-90-g/L-ok"),
            pytest.param("hemoglobin", 89.9, "g/L", None, True, id="hb-89.9-g/L-fails"),
            pytest.param("hemoglobin", 9.0, "g/dL", None, False, id="hb-9.0-g/dL-ok"),
            pytest.param("hemoglobin", 8.99, "g/dL", None, True, id="hb-8.99-g/dL-fails"),
            pytest.param("albumin", 28.0, "g/L", None, False, id="alb-28-g/L-ok"),
            pytest.param("albumin", 27.9, "g/L", None, True, id="alb-27.9-g/L-fails"),
            pytest.param("albumin", 2.8, "g/dL", None, False, id="alb-2.8-g/dL-ok"),
            pytest.param("albumin", 2.79, "g/dL", None, True, id="alb-2.79-g/dL-fails"),
            pytest.param("total_bilirubin", 30.0, "umol/L", 20.0, False, id="bili-uln20-30-ok"),
            pytest.param("total_bilirubin", 30.1, "umol/L", 20.0, True, id="bili-uln20-30.1-fails"),
            pytest.param("total_bilirubin", 1.8, "mg/dL", 1.2, False, id="bili-mgdl-uln1.2-1.8-ok"),
            pytest.param("total_bilirubin", 1.81, "mg/dL", 1.2, True, id="bili-mgdl-uln1.2-1.81-fails"),
            pytest.param("total_bilirubin", 25.65, "umol/L", None, False, id="bili-default-uln-25.65-ok"),
            pytest.param("total_bilirubin", 25.66, "umol/L", None, True, id="bili-default-uln-25.66-fails"),
            pytest.param("alt", 100.0, "U/L", 40.0, False, id="alt-uln40-100-ok"),
            pytest.param("alt", 100.1, "U/L", 40.0, True, id="alt-uln40-100.1-fails"),
            pytest.param("alt", 100.0, "U/L", None, False, id="alt-default-uln-100-ok"),
            pytest.param("alt", 100.1, "U/L", None, True, id="alt-default-uln-100.1-fails"),
            pytest.param("ast", 87.5, "U/L", 35.0, False, id="ast-uln35-87.5-ok"),
            pytest.param("ast", 87.6, "U/L", 35.0, True, id="ast-uln35-87.6-fails"),
            pytest.param("alp", 250.0, "U/L", 100.0, False, id="alp-uln100-250-ok"),
            pytest.param("alp", 250.1, "U/L", 100.0, True, id="alp-uln100-250.1-fails"),
            pytest.param("alp", 312.5, "U/L", None, False, id="alp-default-uln-312.5-ok"),
            pytest.param("alp", 312.6, "U/L", None, True, id="alp-default-uln-312.6-fails"),
            pytest.param("creatinine", 150.0, "umol/L", 100.0, False, id="creat-uln100-150-ok"),
            pytest.param("creatinine", 150.1, "umol/L", 100.0, True, id="creat-uln100-150.1-fails"),
            pytest.param("creatinine", 1.5, "mg/dL", 1.0, False, id="creat-mgdl-uln1.0-1.5-ok"),
            pytest.param("creatinine", 1.51, "mg/dL", 1.0, True, id="creat-mgdl-uln1.0-1.51-fails"),
            pytest.param("creatinine", 121.5, "umol/L", None, False, id="creat-default-uln-121.5-ok"),
            pytest.param("creatinine", 121.6, "umol/L", None, True, id="creat-default-uln-121.6-fails"),
        ],
    )
    @pytest.mark.parametrize("lab_first", [True, False], ids=["lab-then-enrolment", "enrolment-then-lab"])
    def test_limit(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        analyte: str,
        value: float,
        unit: str,
        ref_high: float | None,
        failed: bool,
        lab_first: bool,
    ) -> None:
        screening = lab(make, analyte, value, unit=unit, ref_high=ref_high, day=-3)
        enrolment = make.enrollment(day=0)
        events = [screening, enrolment] if lab_first else [enrolment, screening]
        expected = fails(f"lab.{analyte}") if failed else []
        actual = eligibility(apply_all(events))
        assert expected == actual


class TestScreeningWindow:
    """Screening labs are the latest per analyte dated within the 28 days up to the enrolment, inclusive."""

    @pytest.mark.parametrize(
        ("offset", "expected"),
        [
            pytest.param(timedelta(0), fails("lab.albumin"), id="same-instant-as-enrolment"),
            pytest.param(-timedelta(days=1), fails("lab.albumin"), id="1-day-before"),
            pytest.param(-timedelta(days=28), fails("lab.albumin"), id="exactly-28-days-before"),
            pytest.param(-timedelta(days=29), [], id="29-days-before-outside"),
            pytest.param(-timedelta(days=60), [], id="60-days-before-outside"),
            pytest.param(timedelta(hours=1), [], id="1-hour-after-enrolment"),
            pytest.param(timedelta(days=1), [], id="1-day-after-enrolment"),
        ],
    )
    @pytest.mark.parametrize("lab_first", [True, False], ids=["lab-then-enrolment", "enrolment-then-lab"])
    def test_window(
        self, make: EventFactory, apply_all: ApplyAll, offset: timedelta, expected: Outcome, lab_first: bool
    ) -> None:
        enrolled_at = T0 + timedelta(days=30)
        screening = make.lab(analyte="albumin", value=25.0, unit="g/L", occurred_at=(enrolled_at + offset).isoformat())
        enrolment = make.enrollment(occurred_at=enrolled_at.isoformat())
        events = [screening, enrolment] if lab_first else [enrolment, screening]
        actual = eligibility(apply_all(events))
        assert expected == actual

    @pytest.mark.parametrize(
        ("history", "expected"),
        [
            # (albumin g/L, day relative to the enrolment on day 0)
            pytest.param([(25.0, -10), (35.0, -2)], [], id="later-passing-result-wins"),
            pytest.param([(35.0, -10), (25.0, -2)], fails("lab.albumin"), id="later-failing-result-wins"),
            pytest.param([(35.0, -40), (25.0, -5)], fails("lab.albumin"), id="older-result-outside-window"),
            pytest.param([(25.0, -40), (35.0, -5)], [], id="failing-result-outside-window"),
            pytest.param([(25.0, -5), (35.0, 1)], fails("lab.albumin"), id="passing-result-after-enrolment"),
        ],
    )
    def test_latest_in_window(
        self, make: EventFactory, apply_all: ApplyAll, history: list[tuple[float, int]], expected: Outcome
    ) -> None:
        events = [make.enrollment(day=0)] + [lab(make, "albumin", v, day=d) for v, d in reversed(history)]
        actual = eligibility(apply_all(events))
        assert expected == actual


class TestEligibilityLifecycle:
    """One alert per subject listing every failure; a correction or cancellation of the failing lab resolves it."""

    def test_one_alert_lists_every_failure(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            lab(make, "albumin", 25.0, day=-5),
            lab(make, "wbc", 2.0, day=-5),
            make.enrollment(age_years=17, kps=70, child_pugh_score=9, day=0),
        ]
        (alert,) = of_rule(apply_all(events), ELIGIBILITY)
        expected = {"age", "kps", "child_pugh_score", "lab.albumin", "lab.wbc"}
        actual = {f["criterion"] for f in alert.evidence["failures"]}
        assert expected == actual

    def test_a_further_failure_while_open_says_nothing(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            make.enrollment(kps=70, day=0),
            lab(make, "albumin", 25.0, day=-5),
            lab(make, "wbc", 2.0, day=-4),
        ]
        expected = fails("kps")
        actual = eligibility(apply_all(events))
        assert expected == actual

    def test_nothing_before_the_enrolment_arrives(self, make: EventFactory, run: EngineRun) -> None:
        steps = [
            lab(make, "albumin", 25.0, day=-5),
            lab(make, "hemoglobin", 80.0, day=-5),
            make.enrollment(day=0),
        ]
        actual = [eligibility(run.apply(e)) for e in steps]
        expected = [[], [], fails("lab.albumin", "lab.hemoglobin")]
        assert expected == actual

    @pytest.mark.parametrize(
        ("status", "value"),
        [
            pytest.param("corrected", 35.0, id="corrected-to-passing"),
            pytest.param("corrected", 28.0, id="corrected-to-exactly-the-limit"),
            pytest.param("cancelled", 25.0, id="cancelled"),
        ],
    )
    def test_correction_resolves(self, make: EventFactory, apply_all: ApplyAll, status: str, value: float) -> None:
        events = [
            lab(make, "albumin", 25.0, day=-5, result_id="ALB-1"),
            make.enrollment(day=0),
            lab(make, "albumin", value, day=-5, result_id="ALB-1", status=status),
        ]
        actual = lifecycle(apply_all(events), ELIGIBILITY)
        alert_id = actual[0][0]
        expected = [(alert_id, 1, "firing"), (alert_id, 2, "resolved")]
        assert expected == actual

    def test_correction_still_failing_stays_open(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            lab(make, "albumin", 25.0, day=-5, result_id="ALB-1"),
            make.enrollment(day=0),
            lab(make, "albumin", 27.9, day=-5, result_id="ALB-1", status="corrected"),
        ]
        expected = ["firing"]
        actual = [status for status, _, _ in eligibility(apply_all(events))]
        assert expected == actual

    def test_correction_of_one_of_two_failures_stays_open(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            lab(make, "albumin", 25.0, day=-5, result_id="ALB-1"),
            make.enrollment(kps=70, day=0),
            lab(make, "albumin", 35.0, day=-5, result_id="ALB-1", status="corrected"),
        ]
        expected = ["firing"]
        actual = [status for status, _, _ in eligibility(apply_all(events))]
        assert expected == actual

    def test_evidence_names_enrolment_and_lab(self, make: EventFactory, apply_all: ApplyAll) -> None:
        screening = lab(make, "creatinine", 200.0, ref_high=100.0, day=-5)
        enrolment = make.enrollment(day=0)
        (alert,) = of_rule(apply_all([screening, enrolment]), ELIGIBILITY)
        expected = ([enrolment.event_id, screening.event_id], 200.0, 100.0)
        (failure,) = alert.evidence["failures"]
        actual = (alert.evidence["event_ids"], failure["value"], failure["uln"])
        assert expected == actual
