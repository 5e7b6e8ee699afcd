"""The masked stream (`trial.alerts.masked.v1`): no `arm`, and none of the rules that reveal the arm."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.contract import AlertMessage, mask

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

CST = timezone(timedelta(hours=8))


def alert(rule: str, arm: str | None = "sbrt", **overrides: Any) -> AlertMessage:
    fields: dict[str, Any] = {
        "alert_id": "a1b2c3",
        "revision": 2,
        "status": "firing",
        "rule": rule,
        "severity": "high",
        "subject_id": "TW-001",
        "site_id": "SITE-GZ",
        "arm": arm,
        "occurred_at": datetime(2025, 3, 2, 8, 0, tzinfo=CST),
        "raised_at": datetime(2025, 3, 2, 9, 0, tzinfo=CST),
        "ctcae_grade": 3,
        "report_due_at": None,
        "evidence": {"event_ids": ["lab-0001"], "value": 40.0},
        "summary": "Platelets 40 ×10⁹/L < 50 ×10⁹/L (CTCAE grade 3)",
    }
    fields.update(overrides)
    return AlertMessage(**fields)


ARM_REVEALING_RULES = [
    "sbrt.window.at_risk",
    "sbrt.window.missed",
    "rild.suspected",
    "protocol.crossover",
    "protocol.systemic_held_during_sbrt",
]
BLIND_SAFE_RULES = [
    "lab.platelets.low",
    "lab.bilirubin.high",
    "lab.ctcae.grade3plus",
    "ae.grade3plus",
    "ae.serious",
    "protocol.regimen_mismatch",
    "recist.progression",
    "eligibility.violation",
]


class TestArmRevealingRulesAreDropped:
    """mask() returns None for `sbrt.*`, `rild.*`, `protocol.crossover` and `protocol.systemic_held_during_sbrt`."""

    @pytest.mark.parametrize("rule", ARM_REVEALING_RULES)
    @pytest.mark.parametrize("arm", ["sbrt", "control", None])
    @pytest.mark.parametrize("status", ["firing", "resolved"])
    def test_dropped(self, rule: str, arm: str | None, status: str) -> None:
        assert None is mask(alert(rule, arm=arm, status=status))


class TestOtherRulesAreKeptWithoutArm:
    """mask() keeps every other rule, with every field of the alert except `arm`."""

    @pytest.mark.parametrize("rule", BLIND_SAFE_RULES)
    @pytest.mark.parametrize("arm", ["sbrt", "control", None])
    def test_kept(self, rule: str, arm: str | None) -> None:
        original = alert(rule, arm=arm)
        masked = mask(original)
        assert masked is not None
        expected = original.model_dump(exclude={"arm"})
        assert expected == masked.model_dump()

    @pytest.mark.parametrize("rule", BLIND_SAFE_RULES)
    @pytest.mark.parametrize("arm", ["sbrt", "control", None])
    def test_json_has_no_arm(self, rule: str, arm: str | None) -> None:
        masked = mask(alert(rule, arm=arm))
        assert masked is not None
        assert '"arm"' not in masked.model_dump_json()

    def test_kept_with_report_due_at(self) -> None:
        due = datetime(2025, 3, 3, 9, 0, tzinfo=CST)
        masked = mask(alert("ae.serious", severity="critical", report_due_at=due))
        assert masked is not None
        assert due == masked.report_due_at


class TestEngineAlertsMasked:
    """Every alert the engine raises for an enrolled subject masks to JSON without `"arm"`."""

    @pytest.mark.parametrize("arm", ["sbrt", "control"])
    def test_no_arm_in_masked_json(self, make: EventFactory, apply_all: ApplyAll, arm: str) -> None:
        alerts = apply_all(
            [
                make.enrollment(arm=arm),
                make.lab(analyte="platelets", value=20.0, day=1),
                make.lab(analyte="total_bilirubin", value=60.0, unit="umol/L", day=1),
                make.ae(grade=4, serious=True, day=2),
                make.lab(analyte="platelets", value=160.0, day=3),
            ]
        )
        assert arm in {a.arm for a in alerts}
        masked = [mask(a) for a in alerts]
        assert len(alerts) == len([m for m in masked if m is not None])
        leaks = [m.model_dump_json() for m in masked if m is not None and '"arm"' in m.model_dump_json()]
        expected = []
        assert expected == leaks
