"""Issue 10, defect 4: the contract bounds every field a hospital can send.

Each value here was accepted before: a clinically absurd value must be
dead-lettered with a reason the site can act on, never graded as if it were
true (and never reach arithmetic that overflows).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_contract import encode, message, rejected
from trialwatch.contract import ADVERSE_EVENTS, ENROLLMENT, LABS, MAX_INPUT_BYTES, SCANS, TREATMENT, Lab
from trialwatch.decode import MAX_ERRORS, Rejection, decode
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.units import ANALYTES, CANONICAL_UNIT, PLAUSIBLE

FRACTION = {"kind": "sbrt_fraction", "fraction": 1, "dose_gy": 8.0}
TARGET = {"lesion_id": "L1", "organ": "liver", "role": "target", "diameter_mm": 30.0}


@pytest.mark.parametrize(
    ("topic", "overrides", "reason"),
    [
        pytest.param(LABS, {"value": 1.7e308}, "implausible_value", id="platelets-1.7e308"),
        pytest.param(LABS, {"value": 1.8e308}, "invalid_value", id="platelets-1.8e308-not-finite"),
        pytest.param(LABS, {"analyte": "alp", "unit": "U/L", "value": 1e30}, "implausible_value", id="alp-1e30"),
        pytest.param(LABS, {"occurred_at": "0001-01-01T00:00:00+00:00"}, "implausible_value", id="year-0001"),
        pytest.param(LABS, {"occurred_at": "9999-12-31T10:00:00+08:00"}, "implausible_value", id="year-9999"),
        pytest.param(LABS, {"occurred_at": "2025-03-01T10:00:00-23:59"}, "implausible_value", id="offset--23:59"),
        pytest.param(LABS, {"occurred_at": "2025-03-01T10:00:00+14:30"}, "implausible_value", id="offset-+14:30"),
        pytest.param(
            LABS,
            {"occurred_at": "2025-03-02T10:00:01+08:00", "recorded_at": "2025-03-01T10:00:00+08:00"},
            "implausible_value",
            id="recorded-over-24h-before-occurred",
        ),
        pytest.param(LABS, {"subject_id": " "}, "invalid_value", id="blank-subject"),
        pytest.param(LABS, {"subject_id": "TW-001\x00"}, "invalid_value", id="nul-in-subject"),
        pytest.param(LABS, {"subject_id": "TW-001 "}, "invalid_value", id="trailing-space-subject"),
        pytest.param(LABS, {"site_id": "\x1b[31mSITE"}, "invalid_value", id="escape-in-site"),
        pytest.param(LABS, {"site_id": "x" * 65}, "invalid_value", id="site-65-chars"),
        pytest.param(LABS, {"event_id": "e\u202e1"}, "invalid_value", id="rtl-override-in-event_id"),
        pytest.param(LABS, {"result_id": "r" * 129}, "invalid_value", id="result_id-129-chars"),
        pytest.param(LABS, {"source": "s" * 5000}, "invalid_value", id="source-5000-chars"),
        pytest.param(ADVERSE_EVENTS, {"term": "Fatigue\x00"}, "invalid_value", id="nul-in-term"),
        pytest.param(ADVERSE_EVENTS, {"term": "x" * 600_00}, "invalid_value", id="term-60k-chars"),
        pytest.param(ADVERSE_EVENTS, {"term": "  "}, "invalid_value", id="blank-term"),
        pytest.param(ADVERSE_EVENTS, {"grade": 5, "serious": False}, "implausible_value", id="grade-5-not-serious"),
        pytest.param(TREATMENT, {**FRACTION, "dose_gy": 800.0}, "implausible_value", id="dose-in-cGy"),
        pytest.param(TREATMENT, {**FRACTION, "dose_gy": 61.0}, "implausible_value", id="dose-61-Gy"),
        pytest.param(TREATMENT, {**FRACTION, "fraction": 51}, "implausible_value", id="fraction-51"),
        pytest.param(TREATMENT, {**FRACTION, "note": "n" * 2001}, "invalid_value", id="note-2001-chars"),
        pytest.param(SCANS, {"lesions": [{**TARGET, "diameter_mm": 1200.0}]}, "implausible_value", id="lesion-1.2-m"),
        pytest.param(
            SCANS,
            {"lesions": [{**TARGET, "lesion_id": f"L{i}"} for i in range(101)]},
            "invalid_value",
            id="101-lesions",
        ),
    ],
)
def test_absurd_values_are_dead_lettered(topic: str, overrides: dict[str, Any], reason: str) -> None:
    assert reason == rejected(topic, encode(message(topic, **overrides))).reason


@pytest.mark.parametrize(
    ("topic", "overrides"),
    [
        pytest.param(LABS, {"occurred_at": "2025-03-01T10:00:00-12:00"}, id="offset--12:00"),
        pytest.param(LABS, {"occurred_at": "2025-03-01T10:00:00+14:00"}, id="offset-+14:00"),
        pytest.param(LABS, {"subject_id": "TW 001"}, id="inner-space"),
        pytest.param(LABS, {"site_id": "医院-广州"}, id="non-ascii-site"),
        pytest.param(LABS, {"value": 0.5, "unit": "10*9/L"}, id="platelets-0.5"),
        pytest.param(LABS, {"value": 4999}, id="platelets-4999"),
        pytest.param(
            LABS,
            {"occurred_at": "2025-03-01T10:00:00+08:00", "recorded_at": "2025-03-01T02:00:00+00:00"},
            id="recorded-same-instant-other-offset",
        ),
        pytest.param(ADVERSE_EVENTS, {"grade": 5, "serious": True}, id="grade-5-serious"),
        pytest.param(TREATMENT, {**FRACTION, "dose_gy": 34.0, "note": "line one\nline two"}, id="dose-34-Gy-x1"),
        # What real systems send and must not cost a record (review of issue 10): each was refused
        # by the first version of these bounds, dropping an SAE or an SBRT fraction.
        pytest.param(ADVERSE_EVENTS, {"term": "Hepatic failure ", "serious": True}, id="padded-term"),
        pytest.param(ADVERSE_EVENTS, {"term": "Hepato\u00adtoxicity"}, id="soft-hyphen-in-term"),
        pytest.param(
            ADVERSE_EVENTS,
            {"occurred_at": "2025-03-01T10:00:01+08:00", "recorded_at": "2025-03-01T10:00:00+08:00"},
            id="recorded-1s-before-occurred-clock-skew",
        ),
        pytest.param(ADVERSE_EVENTS, {"source": ""}, id="empty-source"),
        pytest.param(TREATMENT, {**FRACTION, "note": ""}, id="empty-note"),
        pytest.param(TREATMENT, {**FRACTION, "note": "page\x0cbreak"}, id="form-feed-in-note"),
        pytest.param(ENROLLMENT, {"age_years": 16}, id="age-16-is-an-eligibility-matter"),
    ],
)
def test_plausible_edges_are_accepted(topic: str, overrides: dict[str, Any]) -> None:
    result = decode(topic, encode(message(topic, **overrides)))
    assert not isinstance(result, Rejection), result


@pytest.mark.parametrize("analyte", ANALYTES)
def test_every_analyte_has_a_ceiling_in_its_canonical_unit(analyte: str) -> None:
    bounds = PLAUSIBLE[analyte]
    unit = CANONICAL_UNIT[analyte]
    at_max = decode(LABS, encode(message(LABS, analyte=analyte, unit=unit, value=float(bounds.value_max))))
    above = decode(LABS, encode(message(LABS, analyte=analyte, unit=unit, value=float(bounds.value_max) * 1.01)))
    assert isinstance(at_max, Lab)
    assert "implausible_value" == getattr(above, "reason", None)


def test_the_ceiling_applies_after_unit_conversion() -> None:
    # 3,000 umol/L of bilirubin is implausible; so is 200 mg/dL (3,420 umol/L).
    result = rejected(LABS, encode(message(LABS, analyte="total_bilirubin", unit="mg/dL", value=200)))
    assert "implausible_value" == result.reason


def test_a_repeated_key_is_refused_not_silently_resolved() -> None:
    # pydantic keeps the last "value", other parsers the first: the publisher
    # and the service could disagree on the platelet count.
    body = encode(message(LABS, value=20)).replace(b'"value": 20', b'"value": 20, "value": 200')
    result = rejected(LABS, body)
    assert ("duplicate_key", "evt-0001") == (result.reason, result.event_id)


def test_a_repeated_key_in_a_nested_object_is_refused() -> None:
    body = encode(message(SCANS)).replace(b'"role": "target"', b'"role": "target", "role": "new"')
    assert "duplicate_key" == rejected(SCANS, body).reason


def test_an_oversize_record_is_refused_before_parsing() -> None:
    body = encode(message(LABS, source="s")).replace(b'"s"', b'"' + b"s" * MAX_INPUT_BYTES + b'"')
    result = rejected(LABS, body)
    assert "too_large" == result.reason
    assert len(result.detail) < 200


def test_thousands_of_errors_give_a_bounded_rejection() -> None:
    lesions = [{"role": "nope", "lesion_id": "", "organ": ""} for _ in range(80)]
    result = rejected(SCANS, encode(message(SCANS, lesions=lesions)))
    assert len(result.errors) <= MAX_ERRORS
    assert "more errors" in result.detail


def test_deep_nesting_is_refused_not_a_crash() -> None:
    result = rejected(LABS, b'{"value": ' + b"[" * 50_000)
    assert "not_json" == result.reason


def test_plausible_table_covers_every_analyte() -> None:
    # Its bounds are in CANONICAL_UNIT by construction (the table names no unit of its own).
    assert sorted(ANALYTES) == sorted(PLAUSIBLE)


class TestAnImplausibleReferenceRangeIsSetAsideNotTheResult:
    """Defect 3: platelets 20 (grade 4) with ref_high 1e-30 raised InvalidOperation in the engine and was
    dead-lettered as processing_error: no alert. The count is real; only the range is absurd."""

    @pytest.mark.parametrize(
        "ref",
        [
            {"ref_high": 1e-30},
            {"ref_high": 1e6},
            {"ref_low": 1e-30, "ref_high": 1e-30},
            {"ref_low": 5000.0},
            {"ref_high": 0},
            {"ref_low": 350, "ref_high": 125},
        ],
        ids=["uln-1e-30", "uln-1e6", "both-1e-30", "lln-5000", "uln-0", "swapped"],
    )
    def test_a_grade_4_count_still_raises_its_critical_alert(self, ref: dict[str, float]) -> None:
        event = decode(LABS, encode(message(LABS, value=20, **ref)))
        assert isinstance(event, Lab)
        _, alerts = Engine(load_protocol()).apply(None, event, event.occurred_at)
        [alert] = alerts
        assert ("lab.platelets.low", "critical", 4) == (alert.rule, alert.severity, alert.ctcae_grade)
        assert "protocol_default_implausible_site_range" == alert.evidence["uln_origin"]
        assert "set aside" in alert.evidence["uln_note"]

    def test_bilirubin_is_graded_on_the_default_uln_not_the_absurd_one(self) -> None:
        # 60 umol/L against the protocol ULN 17.1: > 3 x ULN, grade 3. Against 1e-30 it would be "infinite".
        body = message(LABS, analyte="total_bilirubin", unit="umol/L", value=60, ref_high=1e-30)
        event = decode(LABS, encode(body))
        assert isinstance(event, Lab)
        _, alerts = Engine(load_protocol()).apply(None, event, event.occurred_at)
        assert [("lab.bilirubin.high", 3, 17.1)] == [(a.rule, a.ctcae_grade, a.evidence["uln"]) for a in alerts]

    def test_a_plausible_site_range_is_used(self) -> None:
        body = message(LABS, analyte="total_bilirubin", unit="umol/L", value=60, ref_high=21.0)
        event = decode(LABS, encode(body))
        assert isinstance(event, Lab)
        _, alerts = Engine(load_protocol()).apply(None, event, event.occurred_at)
        assert [("site", 21.0)] == [(a.evidence["uln_origin"], a.evidence["uln"]) for a in alerts]
