"""`lab.ctcae.grade3plus`: CTCAE v5.0 grades 3 and 4 of the analytes without a rule of their own.

Every grade-3 and grade-4 boundary of every `[ctcae.*]` term of the protocol
file, exactly at the boundary and just past it, in each unit the analyte is
reported in (clinical-facts.md section 1: for decreases "<a-b" means
b <= x < a, for increases ">a-b" means a < x <= b). The baseline is the
analyte's last result at or before the second-line start; the
`abnormal_baseline` grades apply when that baseline is above its ULN, the
normal-baseline (ULN) grades when it is not or when there is none.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.contract import TREATMENT, AlertMessage, InputEvent
from trialwatch.decode import Rejection, decode

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

CST = timezone(timedelta(hours=8))
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=CST)
RULE = "lab.ctcae.grade3plus"

Fired = tuple[str, str, int | None]  # rule, severity, ctcae_grade

G3: list[Fired] = [(RULE, "high", 3)]
G4: list[Fired] = [(RULE, "critical", 4)]
NONE: list[Fired] = []

CANONICAL = {
    "neutrophils": "10*9/L",
    "wbc": "10*9/L",
    "hemoglobin": "g/L",
    "albumin": "g/L",
    "alt": "U/L",
    "ast": "U/L",
    "alp": "U/L",
    "creatinine": "umol/L",
    "inr": "{INR}",
    "afp": "ng/mL",
    "platelets": "10*9/L",
    "total_bilirubin": "umol/L",
}

_treatment_ids = itertools.count(1)


def second_line_start(*, day: float = 0, **overrides: Any) -> InputEvent:
    """A valid `trial.treatment.v1` second-line start (lenvatinib) `day` days after T0."""
    body: dict[str, Any] = {
        "event_id": f"tx-{next(_treatment_ids):04d}",
        "subject_id": "TW-001",
        "site_id": "SITE-GZ",
        "occurred_at": (T0 + timedelta(days=day)).isoformat(),
        "kind": "second_line_start",
        "regimen": "lenvatinib",
    }
    body.update(overrides)
    result = decode(TREATMENT, json.dumps(body).encode())
    if isinstance(result, Rejection):
        raise AssertionError(f"the test built an invalid treatment event {body}: {result.reason}: {result.detail}")
    return result


def lab(make: EventFactory, analyte: str, value: float, **overrides: Any) -> InputEvent:
    """A lab result of `analyte` in its canonical unit unless `unit` is given."""
    overrides.setdefault("unit", CANONICAL[analyte])
    return make.lab(analyte=analyte, value=value, **overrides)


def fired(alerts: list[AlertMessage]) -> list[Fired]:
    return [(a.rule, a.severity, a.ctcae_grade) for a in alerts]


def ctcae_only(alerts: list[AlertMessage]) -> list[Fired]:
    return [f for f in fired(alerts) if f[0] == RULE]


class TestNormalBaselineBoundaries:
    """With no baseline, each grade 3/4 limit is exact: at the limit the lower grade, just past it the higher."""

    @pytest.mark.parametrize(
        ("analyte", "value", "unit", "ref_high", "expected"),
        [
            # Neutrophil count decreased: G3 <1.0-0.5, G4 <0.5 (x10^9/L).
            pytest.param("neutrophils", 1.0, "10*9/L", None, NONE, id="anc-1.0-is-grade-2"),
            pytest.param("neutrophils", 0.99, "10*9/L", None, G3, id="anc-0.99-grade-3"),
            pytest.param("neutrophils", 0.5, "10*9/L", None, G3, id="anc-0.5-grade-3"),
            pytest.param("neutrophils", 0.49, "10*9/L", None, G4, id="anc-0.49-grade-4"),
            pytest.param("neutrophils", 0.0, "10*9/L", None, G4, id="anc-0-grade-4"),
            pytest.param("neutrophils", 1.0, "10*3/uL", None, NONE, id="anc-10*3/uL-1.0"),
            pytest.param("neutrophils", 0.99, "10*3/uL", None, G3, id="anc-10*3/uL-0.99"),
            pytest.param("neutrophils", 0.5, "10^9/L", None, G3, id="anc-10^9/L-0.5"),
            pytest.param("neutrophils", 0.49, "10^9/L", None, G4, id="anc-10^9/L-0.49"),
            pytest.param("neutrophils", 1000.0, "/uL", None, NONE, id="anc-per-uL-1000"),
            pytest.param("neutrophils", 990.0, "/uL", None, G3, id="anc-per-uL-990"),
            pytest.param("neutrophils", 500.0, "/uL", None, G3, id="anc-per-uL-500"),
            pytest.param("neutrophils", 490.0, "/uL", None, G4, id="anc-per-uL-490"),
            # WBC decreased: G3 <2.0-1.0, G4 <1.0.
            pytest.param("wbc", 2.0, "10*9/L", None, NONE, id="wbc-2.0-is-grade-2"),
            pytest.param("wbc", 1.99, "10*9/L", None, G3, id="wbc-1.99-grade-3"),
            pytest.param("wbc", 1.0, "10*9/L", None, G3, id="wbc-1.0-grade-3"),
            pytest.param("wbc", 0.99, "10*9/L", None, G4, id="wbc-0.99-grade-4"),
            pytest.param("wbc", 2.0, "10*3/uL", None, NONE, id="wbc-10*3/uL-2.0"),
            pytest.param("wbc", 1.99, "10*3/uL", None, G3, id="wbc-10*3/uL-1.99"),
            pytest.param("wbc", 1.0, "10*3/uL", None, G3, id="wbc-10*3/uL-1.0"),
            pytest.param("wbc", 0.99, "10*3/uL", None, G4, id="wbc-10*3/uL-0.99"),
            pytest.param("wbc", 2000.0, "/uL", None, NONE, id="wbc-per-uL-2000"),
            pytest.param("wbc", 1990.0, "/uL", None, G3, id="wbc-per-uL-1990"),
            pytest.param("wbc", 990.0, "/uL", None, G4, id="wbc-per-uL-990"),
            # Anaemia: G3 <80 g/L; grade 4 is clinical, never a lab value.
            pytest.param("hemoglobin", 80.0, "g/L", None, NONE, id="hb-80-g/L-is-grade-2"),
            pytest.param("hemoglobin", 79.9, "g/L", None, G3, id="hb-79.9-g/L-grade-3"),
            pytest.param("hemoglobin", 8.0, "g/dL", None, NONE, id="hb-8.0-g/dL-is-grade-2"),
            pytest.param("hemoglobin", 7.99, "g/dL", None, G3, id="hb-7.99-g/dL-grade-3"),
            pytest.param("hemoglobin", 30.0, "g/L", None, G3, id="hb-30-g/L-no-lab-grade-4"),
            pytest.param("hemoglobin", 0.0, "g/L", None, G3, id="hb-0-no-lab-grade-4"),
            # Hypoalbuminaemia: G3 <20 g/L; grade 4 is clinical.
            pytest.param("albumin", 20.0, "g/L", None, NONE, id="alb-20-g/L-is-grade-2"),
            pytest.param("albumin", 19.9, "g/L", None, G3, id="alb-19.9-g/L-grade-3"),
            pytest.param("albumin", 2.0, "g/dL", None, NONE, id="alb-2.0-g/dL-is-grade-2"),
            pytest.param("albumin", 1.99, "g/dL", None, G3, id="alb-1.99-g/dL-grade-3"),
            pytest.param("albumin", 5.0, "g/L", None, G3, id="alb-5-g/L-no-lab-grade-4"),
            # ALT, site ULN 40: G3 >5-20 x ULN (200-800), G4 >20 x ULN.
            pytest.param("alt", 200.0, "U/L", 40.0, NONE, id="alt-uln40-200-exactly-5x"),
            pytest.param("alt", 200.1, "U/L", 40.0, G3, id="alt-uln40-200.1"),
            pytest.param("alt", 800.0, "U/L", 40.0, G3, id="alt-uln40-800-exactly-20x"),
            pytest.param("alt", 800.1, "U/L", 40.0, G4, id="alt-uln40-800.1"),
            pytest.param("alt", 250.0, "IU/L", 50.0, NONE, id="alt-IU/L-uln50-250"),
            pytest.param("alt", 250.1, "IU/L", 50.0, G3, id="alt-IU/L-uln50-250.1"),
            pytest.param("alt", 1000.0, "IU/L", 50.0, G3, id="alt-IU/L-uln50-1000"),
            pytest.param("alt", 1000.1, "IU/L", 50.0, G4, id="alt-IU/L-uln50-1000.1"),
            # ALT with no ref_high: the protocol default ULN 40 U/L.
            pytest.param("alt", 200.0, "U/L", None, NONE, id="alt-default-uln-200"),
            pytest.param("alt", 200.1, "U/L", None, G3, id="alt-default-uln-200.1"),
            pytest.param("alt", 800.0, "U/L", None, G3, id="alt-default-uln-800"),
            pytest.param("alt", 800.1, "U/L", None, G4, id="alt-default-uln-800.1"),
            # AST, site ULN 35: 175 and 700.
            pytest.param("ast", 175.0, "U/L", 35.0, NONE, id="ast-uln35-175-exactly-5x"),
            pytest.param("ast", 175.1, "U/L", 35.0, G3, id="ast-uln35-175.1"),
            pytest.param("ast", 700.0, "U/L", 35.0, G3, id="ast-uln35-700-exactly-20x"),
            pytest.param("ast", 700.1, "U/L", 35.0, G4, id="ast-uln35-700.1"),
            pytest.param("ast", 200.0, "U/L", 40.0, NONE, id="ast-uln40-200"),
            pytest.param("ast", 200.1, "U/L", 40.0, G3, id="ast-uln40-200.1"),
            # AST with no ref_high: the protocol default ULN 35 U/L.
            pytest.param("ast", 175.0, "U/L", None, NONE, id="ast-default-uln-175"),
            pytest.param("ast", 175.1, "U/L", None, G3, id="ast-default-uln-175.1"),
            pytest.param("ast", 700.0, "U/L", None, G3, id="ast-default-uln-700"),
            pytest.param("ast", 700.1, "U/L", None, G4, id="ast-default-uln-700.1"),
            # ALP, site ULN 100: G3 >5-20 x ULN (500-2000), G4 >20 x ULN.
            pytest.param("alp", 500.0, "U/L", 100.0, NONE, id="alp-uln100-500-exactly-5x"),
            pytest.param("alp", 500.1, "U/L", 100.0, G3, id="alp-uln100-500.1"),
            pytest.param("alp", 2000.0, "U/L", 100.0, G3, id="alp-uln100-2000-exactly-20x"),
            pytest.param("alp", 2000.1, "U/L", 100.0, G4, id="alp-uln100-2000.1"),
            # ALP with no ref_high: the protocol default ULN 125 U/L.
            pytest.param("alp", 625.0, "U/L", None, NONE, id="alp-default-uln-625"),
            pytest.param("alp", 625.1, "U/L", None, G3, id="alp-default-uln-625.1"),
            pytest.param("alp", 2500.0, "U/L", None, G3, id="alp-default-uln-2500"),
            pytest.param("alp", 2500.1, "U/L", None, G4, id="alp-default-uln-2500.1"),
            # Creatinine, site ULN 100 umol/L: G3 >3-6 x ULN (300-600), G4 >6 x ULN.
            pytest.param("creatinine", 300.0, "umol/L", 100.0, NONE, id="creat-uln100-300-exactly-3x"),
            pytest.param("creatinine", 300.1, "umol/L", 100.0, G3, id="creat-uln100-300.1"),
            pytest.param("creatinine", 600.0, "umol/L", 100.0, G3, id="creat-uln100-600-exactly-6x"),
            pytest.param("creatinine", 600.1, "umol/L", 100.0, G4, id="creat-uln100-600.1"),
            # Creatinine in mg/dL, site ULN 1.2 mg/dL: 3.6 and 7.2 mg/dL.
            pytest.param("creatinine", 3.6, "mg/dL", 1.2, NONE, id="creat-mgdl-uln1.2-3.6-exactly-3x"),
            pytest.param("creatinine", 3.61, "mg/dL", 1.2, G3, id="creat-mgdl-uln1.2-3.61"),
            pytest.param("creatinine", 7.2, "mg/dL", 1.2, G3, id="creat-mgdl-uln1.2-7.2-exactly-6x"),
            pytest.param("creatinine", 7.21, "mg/dL", 1.2, G4, id="creat-mgdl-uln1.2-7.21"),
            # Creatinine with no ref_high: the protocol default ULN 81 umol/L (243 and 486).
            pytest.param("creatinine", 243.0, "umol/L", None, NONE, id="creat-default-uln-243"),
            pytest.param("creatinine", 243.1, "umol/L", None, G3, id="creat-default-uln-243.1"),
            pytest.param("creatinine", 486.0, "umol/L", None, G3, id="creat-default-uln-486"),
            pytest.param("creatinine", 486.1, "umol/L", None, G4, id="creat-default-uln-486.1"),
            # mg/dL with no ref_high: 3 x 81 umol/L = 243 umol/L = 2.75 mg/dL (x88.4 = 243.1).
            pytest.param("creatinine", 2.74, "mg/dL", None, NONE, id="creat-default-uln-2.74-mgdl"),
            pytest.param("creatinine", 2.75, "mg/dL", None, G3, id="creat-default-uln-2.75-mgdl"),
            # INR (not anticoagulated): G3 >2.5; there is no grade 4.
            pytest.param("inr", 2.5, "{INR}", None, NONE, id="inr-2.5-is-grade-2"),
            pytest.param("inr", 2.51, "{INR}", None, G3, id="inr-2.51-grade-3"),
            pytest.param("inr", 2.51, "INR", None, G3, id="inr-INR-spelling-2.51"),
            pytest.param("inr", 9.0, "{INR}", None, G3, id="inr-9-no-grade-4"),
        ],
    )
    def test_boundary(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        analyte: str,
        value: float,
        unit: str,
        ref_high: float | None,
        expected: list[Fired],
    ) -> None:
        actual = fired(apply_all([lab(make, analyte, value, unit=unit, ref_high=ref_high)]))
        assert expected == actual


class TestAbnormalBaselineBoundaries:
    """With a baseline above its ULN before the second-line start, grades 3/4 are > 5 and > 20 × the baseline."""

    @pytest.mark.parametrize(
        ("analyte", "baseline", "value", "ref_high", "expected"),
        [
            # ALT baseline 80 (2 x ULN 40): G3 >5 x BL = 400, G4 >20 x BL = 1600.
            pytest.param("alt", 80.0, 400.0, 40.0, NONE, id="alt-bl80-400-exactly-5xBL"),
            pytest.param("alt", 80.0, 400.1, 40.0, G3, id="alt-bl80-400.1"),
            pytest.param("alt", 80.0, 1600.0, 40.0, G3, id="alt-bl80-1600-exactly-20xBL"),
            pytest.param("alt", 80.0, 1600.1, 40.0, G4, id="alt-bl80-1600.1"),
            # 300 is 7.5 x ULN (grade 3 on a normal baseline) but only 3.75 x BL: grade 2.
            pytest.param("alt", 80.0, 300.0, 40.0, NONE, id="alt-bl80-300-over-5xULN-not-5xBL"),
            # 900 is 22.5 x ULN (grade 4 on a normal baseline) but 11.25 x BL: grade 3.
            pytest.param("alt", 80.0, 900.0, 40.0, G3, id="alt-bl80-900-over-20xULN-not-20xBL"),
            # AST baseline 70 (2 x ULN 35): 350 and 1400.
            pytest.param("ast", 70.0, 350.0, 35.0, NONE, id="ast-bl70-350-exactly-5xBL"),
            pytest.param("ast", 70.0, 350.1, 35.0, G3, id="ast-bl70-350.1"),
            pytest.param("ast", 70.0, 1400.0, 35.0, G3, id="ast-bl70-1400-exactly-20xBL"),
            pytest.param("ast", 70.0, 1400.1, 35.0, G4, id="ast-bl70-1400.1"),
            # ALP baseline 150 (1.5 x ULN 100): 750 and 3000.
            pytest.param("alp", 150.0, 750.0, 100.0, NONE, id="alp-bl150-750-exactly-5xBL"),
            pytest.param("alp", 150.0, 750.1, 100.0, G3, id="alp-bl150-750.1"),
            pytest.param("alp", 150.0, 3000.0, 100.0, G3, id="alp-bl150-3000-exactly-20xBL"),
            pytest.param("alp", 150.0, 3000.1, 100.0, G4, id="alp-bl150-3000.1"),
            pytest.param("alp", 150.0, 600.0, 100.0, NONE, id="alp-bl150-600-over-5xULN-not-5xBL"),
        ],
    )
    def test_boundary(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        analyte: str,
        baseline: float,
        value: float,
        ref_high: float,
        expected: list[Fired],
    ) -> None:
        events = [
            lab(make, analyte, baseline, ref_high=ref_high, day=-3),
            second_line_start(day=0),
            lab(make, analyte, value, ref_high=ref_high, day=30),
        ]
        actual = fired(apply_all(events))
        assert expected == actual


class TestCreatinineBaselineCriterion:
    """Creatinine is grade 3 above 3 × baseline even under the ULN; the baseline never gives grade 4."""

    @pytest.mark.parametrize(
        ("baseline", "value", "unit", "ref_high", "expected"),
        [
            # Baseline 30 umol/L, site ULN 100 (normal): 3 x BL = 90, under the ULN.
            pytest.param(30.0, 90.0, "umol/L", 100.0, NONE, id="bl30-90-exactly-3xBL"),
            pytest.param(30.0, 90.1, "umol/L", 100.0, G3, id="bl30-90.1-over-3xBL-under-ULN"),
            # 20 x BL but exactly 6 x ULN: still grade 3 (no "x BL" grade 4).
            pytest.param(30.0, 600.0, "umol/L", 100.0, G3, id="bl30-600-20xBL-exactly-6xULN"),
            pytest.param(30.0, 600.1, "umol/L", 100.0, G4, id="bl30-600.1-over-6xULN"),
            # In mg/dL: baseline 0.4, ULN 1.2; 3 x BL = 1.2 mg/dL.
            pytest.param(0.4, 1.2, "mg/dL", 1.2, NONE, id="mgdl-bl0.4-1.2-exactly-3xBL"),
            pytest.param(0.4, 1.21, "mg/dL", 1.2, G3, id="mgdl-bl0.4-1.21-over-3xBL"),
            # An abnormal baseline (150 > ULN 100): the ULN criterion still applies.
            pytest.param(150.0, 300.0, "umol/L", 100.0, NONE, id="abnormal-bl150-300-2xBL-3xULN"),
            pytest.param(150.0, 300.1, "umol/L", 100.0, G3, id="abnormal-bl150-300.1-over-3xULN"),
            pytest.param(150.0, 600.1, "umol/L", 100.0, G4, id="abnormal-bl150-600.1-over-6xULN"),
        ],
    )
    def test_boundary(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        baseline: float,
        value: float,
        unit: str,
        ref_high: float,
        expected: list[Fired],
    ) -> None:
        events = [
            lab(make, "creatinine", baseline, unit=unit, ref_high=ref_high, day=-3),
            second_line_start(day=0),
            lab(make, "creatinine", value, unit=unit, ref_high=ref_high, day=30),
        ]
        actual = fired(apply_all(events))
        assert expected == actual

    def test_no_second_line_start_no_baseline_criterion(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            lab(make, "creatinine", 30.0, ref_high=100.0, day=-3),
            lab(make, "creatinine", 90.1, ref_high=100.0, day=30),
        ]
        expected = NONE
        actual = fired(apply_all(events))
        assert expected == actual


class TestWhichBaseline:
    """The baseline is the analyte's last result at or before the second-line start, abnormal when above its ULN."""

    @pytest.mark.parametrize(
        ("history", "start_day", "expected"),
        [
            # (value, ref_high, day) of earlier ALT results; then ALT 200.1 (ULN 40) on day 30:
            # grade 3 on a normal baseline (> 5 x ULN 200), none on a baseline of 80 (5 x BL = 400).
            pytest.param([(80.0, 40.0, -3)], 0, NONE, id="abnormal-before-start"),
            pytest.param([(80.0, 40.0, 0)], 0, NONE, id="abnormal-exactly-at-start"),
            pytest.param([(80.0, 40.0, 1)], 0, G3, id="abnormal-after-start-is-no-baseline"),
            pytest.param([(80.0, 40.0, -3)], None, G3, id="no-second-line-start-ULN-grades"),
            pytest.param([(80.0, 40.0, -10), (40.0, 40.0, -3)], 0, G3, id="last-before-start-normal-wins"),
            pytest.param([(40.0, 40.0, -10), (80.0, 40.0, -3)], 0, NONE, id="last-before-start-abnormal-wins"),
            pytest.param([(40.0, 40.0, -3)], 0, G3, id="baseline-exactly-ULN-is-normal"),
            pytest.param([(40.1, 40.0, -3)], 0, NONE, id="baseline-just-above-ULN-is-abnormal"),
            # Abnormal is judged on the baseline result's own ULN.
            pytest.param([(45.0, 50.0, -3)], 0, G3, id="baseline-45-under-its-own-ULN-50"),
            # No ref_high on the baseline: the protocol default ULN 40 decides.
            pytest.param([(41.0, None, -3)], 0, NONE, id="baseline-41-over-default-ULN"),
            pytest.param([(40.0, None, -3)], 0, G3, id="baseline-40-at-default-ULN"),
        ],
    )
    def test_baseline(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        history: list[tuple[float, float | None, int]],
        start_day: int | None,
        expected: list[Fired],
    ) -> None:
        events = [lab(make, "alt", value, ref_high=ref_high, day=day) for value, ref_high, day in history]
        if start_day is not None:
            events.append(second_line_start(day=start_day))
        events.append(lab(make, "alt", 200.1, ref_high=40.0, day=30))
        actual = ctcae_only(apply_all(events))
        assert expected == actual

    def test_start_arriving_before_the_baseline_result(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            second_line_start(day=0),
            lab(make, "alt", 80.0, ref_high=40.0, day=-3),
            lab(make, "alt", 400.0, ref_high=40.0, day=30),
            lab(make, "alt", 400.1, ref_high=40.0, day=31),
        ]
        expected = G3
        actual = ctcae_only(apply_all(events))
        assert expected == actual

    def test_evidence_names_the_baseline(self, make: EventFactory, apply_all: ApplyAll) -> None:
        base = lab(make, "alt", 80.0, ref_high=40.0, day=-3)
        (alert,) = apply_all([base, second_line_start(day=0), lab(make, "alt", 400.1, ref_high=40.0, day=30)])
        expected = {"value": 80.0, "event_id": base.event_id, "abnormal": True}
        actual = {k: alert.evidence["baseline"][k] for k in expected}
        assert expected == actual


Message = tuple[str, int, str, str, int | None]  # alert_id, revision, status, severity, ctcae_grade


def messages(alerts: list[AlertMessage]) -> list[Message]:
    return [(a.alert_id, a.revision, a.status, a.severity, a.ctcae_grade) for a in alerts if a.rule == RULE]


class TestLifecycle:
    """One alert per subject and analyte: it escalates 3→4 under its id, resolves on a non-breaching later result."""

    def test_escalation_keeps_the_alert_id(self, make: EventFactory, apply_all: ApplyAll) -> None:
        actual = messages(apply_all([lab(make, "neutrophils", 0.9, day=1), lab(make, "neutrophils", 0.4, day=2)]))
        alert_id = actual[0][0]
        expected = [(alert_id, 1, "firing", "high", 3), (alert_id, 2, "firing", "critical", 4)]
        assert expected == actual

    @pytest.mark.parametrize(
        ("values", "expected_grades"),
        [
            pytest.param([0.9, 0.8], [3], id="grade-3-again"),
            pytest.param([0.4, 0.9], [4], id="grade-4-then-3"),
            pytest.param([0.4, 0.3], [4], id="grade-4-again"),
            pytest.param([0.9, 0.4, 0.8], [3, 4], id="3-4-3"),
        ],
    )
    def test_same_or_lower_grade_while_open_says_nothing(
        self, make: EventFactory, apply_all: ApplyAll, values: list[float], expected_grades: list[int]
    ) -> None:
        alerts = apply_all([lab(make, "neutrophils", v, day=i + 1) for i, v in enumerate(values)])
        actual = [m[4] for m in messages(alerts)]
        assert expected_grades == actual

    @pytest.mark.parametrize(
        ("analyte", "breach", "later", "ref_high"),
        [
            pytest.param("neutrophils", 0.9, 2.0, None, id="anc-normal"),
            pytest.param("neutrophils", 0.4, 1.2, None, id="anc-grade-4-then-grade-2"),
            pytest.param("hemoglobin", 70.0, 85.0, None, id="hb-grade-2"),
            pytest.param("alt", 250.0, 30.0, 40.0, id="alt-normal"),
            pytest.param("alt", 250.0, 200.0, 40.0, id="alt-exactly-5xULN"),
            pytest.param("inr", 3.0, 2.5, None, id="inr-2.5"),
        ],
    )
    def test_a_later_non_breaching_result_resolves(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        analyte: str,
        breach: float,
        later: float,
        ref_high: float | None,
    ) -> None:
        alerts = apply_all(
            [
                lab(make, analyte, breach, ref_high=ref_high, day=1),
                lab(make, analyte, later, ref_high=ref_high, day=2),
            ]
        )
        actual = [(m[0], m[1], m[2]) for m in messages(alerts)]
        alert_id = actual[0][0]
        expected = [(alert_id, 1, "firing"), (alert_id, 2, "resolved")]
        assert expected == actual

    def test_a_breach_after_resolution_opens_a_new_alert(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                lab(make, "wbc", 1.5, day=1),
                lab(make, "wbc", 4.0, day=2),
                lab(make, "wbc", 1.5, day=3),
            ]
        )
        actual = messages(alerts)
        expected = 3
        assert expected == len(actual)
        first, second = actual[0][0], actual[2][0]
        expected_ids = (first, first, second)
        assert expected_ids == tuple(m[0] for m in actual)
        assert first != second
        expected_last = (second, 1, "firing", "high", 3)
        assert expected_last == actual[2]


class TestAnalytesAreIndependent:
    """Each analyte has its own alert: one resolving or escalating leaves the others as they are."""

    def test_one_alert_per_analyte(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                lab(make, "alt", 250.0, ref_high=40.0, day=1),
                lab(make, "ast", 200.0, ref_high=35.0, day=1),
                lab(make, "neutrophils", 0.8, day=1),
                lab(make, "wbc", 1.5, day=1),
            ]
        )
        expected = ["alt", "ast", "neutrophils", "wbc"]
        actual = [a.evidence["analyte"] for a in alerts if a.rule == RULE]
        assert expected == actual
        expected_distinct = 4
        assert expected_distinct == len({a.alert_id for a in alerts})

    def test_resolving_one_leaves_the_other_firing(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                lab(make, "alt", 250.0, ref_high=40.0, day=1),
                lab(make, "ast", 200.0, ref_high=35.0, day=1),
                lab(make, "alt", 30.0, ref_high=40.0, day=2),
                lab(make, "ast", 190.0, ref_high=35.0, day=3),
            ]
        )
        ids = {a.evidence["analyte"]: a.alert_id for a in alerts if a.revision == 1}
        expected = [(ids["alt"], "firing"), (ids["ast"], "firing"), (ids["alt"], "resolved")]
        actual = [(a.alert_id, a.status) for a in alerts if a.rule == RULE]
        assert expected == actual

    def test_escalating_one_leaves_the_other(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                lab(make, "neutrophils", 0.9, day=1),
                lab(make, "wbc", 1.5, day=1),
                lab(make, "wbc", 0.5, day=2),
            ]
        )
        expected = [("neutrophils", 1, 3), ("wbc", 1, 3), ("wbc", 2, 4)]
        actual = [(a.evidence["analyte"], a.revision, a.ctcae_grade) for a in alerts if a.rule == RULE]
        assert expected == actual


class TestAnalytesWithoutCtcaeAlert:
    """AFP is never graded; platelets and bilirubin raise only their own rules, never `lab.ctcae.grade3plus`."""

    @pytest.mark.parametrize(
        ("value", "unit"),
        [
            pytest.param(7.0, "ng/mL", id="afp-7-ngml"),
            pytest.param(400.0, "ng/mL", id="afp-400-ngml"),
            pytest.param(100000.0, "ng/mL", id="afp-100000-ngml"),
            pytest.param(50000.0, "[IU]/mL", id="afp-50000-IU/mL"),
            pytest.param(100000.0, "ug/L", id="afp-100000-ug/L"),
        ],
    )
    def test_afp_never_alerts(self, make: EventFactory, apply_all: ApplyAll, value: float, unit: str) -> None:
        events = [
            lab(make, "afp", 3.0, unit="ng/mL", ref_high=7.0, day=-3),
            second_line_start(day=0),
            lab(make, "afp", value, unit=unit, day=30),
        ]
        expected = NONE
        actual = fired(apply_all(events))
        assert expected == actual

    @pytest.mark.parametrize(
        ("analyte", "value", "unit", "expected_rules"),
        [
            pytest.param("platelets", 40.0, "10*9/L", ["lab.platelets.low"], id="platelets-grade-3"),
            pytest.param("platelets", 10.0, "10*9/L", ["lab.platelets.low"], id="platelets-grade-4"),
            pytest.param("total_bilirubin", 60.0, "umol/L", ["lab.bilirubin.high"], id="bilirubin-grade-3"),
            pytest.param("total_bilirubin", 200.0, "umol/L", ["lab.bilirubin.high"], id="bilirubin-grade-4"),
            pytest.param("total_bilirubin", 12.0, "mg/dL", ["lab.bilirubin.high"], id="bilirubin-mgdl-grade-4"),
        ],
    )
    def test_platelets_and_bilirubin_have_their_own_rules(
        self, make: EventFactory, apply_all: ApplyAll, analyte: str, value: float, unit: str, expected_rules: list[str]
    ) -> None:
        events = [lab(make, analyte, value, unit=unit, day=1)]
        actual = [a.rule for a in apply_all(events)]
        assert expected_rules == actual
