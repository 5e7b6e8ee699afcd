"""Lab rules of contract v1: `lab.platelets.low` and `lab.bilirubin.high`, exactly at their boundaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from trialwatch.contract import AlertMessage

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

Fired = tuple[str, str, int | None]  # rule, severity, ctcae_grade


def fired(alerts: list[AlertMessage]) -> list[Fired]:
    return [(a.rule, a.severity, a.ctcae_grade) for a in alerts]


PLATELETS_HIGH: list[Fired] = [("lab.platelets.low", "high", 3)]
PLATELETS_CRITICAL: list[Fired] = [("lab.platelets.low", "critical", 4)]


class TestPlateletBands:
    """Platelets fire strictly below 50 ×10⁹/L (CTCAE 3, high) and strictly below 25 (CTCAE 4, critical)."""

    @pytest.mark.parametrize(
        ("value", "unit", "expected"),
        [
            pytest.param(160.0, "10*9/L", [], id="160-normal"),
            pytest.param(50.0, "10*9/L", [], id="50-exactly-the-limit"),
            pytest.param(49.99, "10*9/L", PLATELETS_HIGH, id="49.99-just-below-50"),
            pytest.param(25.0, "10*9/L", PLATELETS_HIGH, id="25-exactly-the-grade-4-limit"),
            pytest.param(24.99, "10*9/L", PLATELETS_CRITICAL, id="24.99-just-below-25"),
            pytest.param(0.0, "10*9/L", PLATELETS_CRITICAL, id="0"),
            pytest.param(50.0, "10^9/L", [], id="10^9/L-spelling-50"),
            pytest.param(49.99, "10^9/L", PLATELETS_HIGH, id="10^9/L-spelling-49.99"),
            pytest.param(50.0, "10*3/uL", [], id="10*3/uL-50"),
            pytest.param(49.99, "10*3/uL", PLATELETS_HIGH, id="10*3/uL-49.99"),
            pytest.param(25.0, "10^3/uL", PLATELETS_HIGH, id="10^3/uL-25"),
            pytest.param(24.99, "10^3/uL", PLATELETS_CRITICAL, id="10^3/uL-24.99"),
            pytest.param(50000.0, "/uL", [], id="per-uL-50000"),
            pytest.param(49990.0, "/uL", PLATELETS_HIGH, id="per-uL-49990"),
            pytest.param(25000.0, "/uL", PLATELETS_HIGH, id="per-uL-25000"),
            pytest.param(24990.0, "/uL", PLATELETS_CRITICAL, id="per-uL-24990"),
        ],
    )
    def test_band(
        self, make: EventFactory, apply_all: ApplyAll, value: float, unit: str, expected: list[Fired]
    ) -> None:
        actual = fired(apply_all([make.lab(analyte="platelets", value=value, unit=unit)]))
        assert expected == actual


BILI_WARNING: list[Fired] = [("lab.bilirubin.high", "warning", 2)]
BILI_HIGH: list[Fired] = [("lab.bilirubin.high", "high", 3)]
BILI_CRITICAL: list[Fired] = [("lab.bilirubin.high", "critical", 4)]


class TestBilirubinBands:
    """Bilirubin fires strictly above 1.5 × ULN (warning), 3 × ULN (high) and 10 × ULN (critical)."""

    @pytest.mark.parametrize(
        ("value", "unit", "ref_high", "expected"),
        [
            # Site ULN 17.1 umol/L: 1.5x = 25.65, 3x = 51.3, 10x = 171.
            pytest.param(17.1, "umol/L", 17.1, [], id="umol-1x-ULN"),
            pytest.param(25.65, "umol/L", 17.1, [], id="umol-exactly-1.5x"),
            pytest.param(25.66, "umol/L", 17.1, BILI_WARNING, id="umol-just-above-1.5x"),
            pytest.param(51.3, "umol/L", 17.1, BILI_WARNING, id="umol-exactly-3x"),
            pytest.param(51.31, "umol/L", 17.1, BILI_HIGH, id="umol-just-above-3x"),
            pytest.param(171.0, "umol/L", 17.1, BILI_HIGH, id="umol-exactly-10x"),
            pytest.param(171.01, "umol/L", 17.1, BILI_CRITICAL, id="umol-just-above-10x"),
            # Site ULN 1.2 mg/dL: 1.5x = 1.8, 3x = 3.6, 10x = 12.0.
            pytest.param(1.8, "mg/dL", 1.2, [], id="mgdl-exactly-1.5x"),
            pytest.param(1.81, "mg/dL", 1.2, BILI_WARNING, id="mgdl-just-above-1.5x"),
            pytest.param(3.6, "mg/dL", 1.2, BILI_WARNING, id="mgdl-exactly-3x"),
            pytest.param(3.61, "mg/dL", 1.2, BILI_HIGH, id="mgdl-just-above-3x"),
            pytest.param(12.0, "mg/dL", 1.2, BILI_HIGH, id="mgdl-exactly-10x"),
            pytest.param(12.01, "mg/dL", 1.2, BILI_CRITICAL, id="mgdl-just-above-10x"),
            # Site ULN 21 umol/L: the site's range, not the protocol default, sets the limit.
            pytest.param(30.0, "umol/L", 21.0, [], id="site-ULN-21-30-is-below-1.5x"),
            pytest.param(31.51, "umol/L", 21.0, BILI_WARNING, id="site-ULN-21-31.51"),
            # No ref_high: the protocol default ULN 17.1 umol/L applies.
            pytest.param(25.65, "umol/L", None, [], id="default-ULN-exactly-1.5x"),
            pytest.param(25.66, "umol/L", None, BILI_WARNING, id="default-ULN-just-above-1.5x"),
            pytest.param(51.31, "umol/L", None, BILI_HIGH, id="default-ULN-just-above-3x"),
            pytest.param(171.01, "umol/L", None, BILI_CRITICAL, id="default-ULN-just-above-10x"),
            pytest.param(1.5, "mg/dL", None, [], id="default-ULN-mgdl-exactly-1.5x"),
            pytest.param(1.51, "mg/dL", None, BILI_WARNING, id="default-ULN-mgdl-just-above-1.5x"),
        ],
    )
    def test_band(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        value: float,
        unit: str,
        ref_high: float | None,
        expected: list[Fired],
    ) -> None:
        event = make.lab(analyte="total_bilirubin", value=value, unit=unit, ref_high=ref_high)
        actual = fired(apply_all([event]))
        assert expected == actual


class TestLabEvidence:
    """A lab alert's evidence names the triggering event, the value, unit, threshold and the ULN with its origin."""

    @pytest.mark.parametrize(
        ("ref_high", "expected_origin"),
        [
            pytest.param(17.1, "site", id="site-ref_high"),
            pytest.param(None, "protocol_default", id="no-ref_high"),
        ],
    )
    def test_bilirubin_uln_origin(
        self, make: EventFactory, apply_all: ApplyAll, ref_high: float | None, expected_origin: str
    ) -> None:
        event = make.lab(analyte="total_bilirubin", value=60.0, unit="umol/L", ref_high=ref_high)
        (alert,) = apply_all([event])
        ev = alert.evidence
        expected = ([event.event_id], 60.0, "umol/L", 17.1, expected_origin)
        assert expected == (ev["event_ids"], ev["value"], ev["unit"], ev["uln"], ev["uln_origin"])
        assert "threshold" in ev

    def test_site_uln_is_the_one_used(self, make: EventFactory, apply_all: ApplyAll) -> None:
        event = make.lab(analyte="total_bilirubin", value=40.0, unit="umol/L", ref_high=21.0)
        (alert,) = apply_all([event])
        expected = (21.0, "site")
        assert expected == (alert.evidence["uln"], alert.evidence["uln_origin"])

    def test_platelets(self, make: EventFactory, apply_all: ApplyAll) -> None:
        event = make.lab(analyte="platelets", value=40.0, unit="10*9/L")
        (alert,) = apply_all([event])
        ev = alert.evidence
        assert [event.event_id] == ev["event_ids"]
        expected = (40.0, "10*9/L")
        assert expected == (ev["value"], ev["unit"])
        assert "threshold" in ev

    def test_alert_carries_the_event_identity(self, make: EventFactory, apply_all: ApplyAll) -> None:
        event = make.lab(analyte="platelets", value=40.0, subject_id="TW-042", site_id="SITE-SH", day=3)
        (alert,) = apply_all([event])
        expected = ("firing", 1, "TW-042", "SITE-SH", event.occurred_at)
        assert expected == (alert.status, alert.revision, alert.subject_id, alert.site_id, alert.occurred_at)
