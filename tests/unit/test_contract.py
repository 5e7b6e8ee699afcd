"""Input decoding against the fixed v1 event contract (/work/shared/contract/events-v1.md).

Every expectation here is taken from the contract text, not from the models:
a message either decodes to its topic's model or comes back as a `Rejection`
whose reason, detail and event_id let the publisher fix it.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trialwatch.contract import (
    ADVERSE_EVENTS,
    ENROLLMENT,
    LABS,
    SCANS,
    TREATMENT,
    AdverseEvent,
    Enrollment,
    Lab,
    Scan,
    Treatment,
)
from trialwatch.decode import Rejection, decode

# --------------------------------------------------------------------------- helpers

DELETE = object()
"""Override value that removes the field from the message."""

EVENT_ID = "evt-0001"
OCCURRED_AT = "2025-03-01T08:00:00+08:00"

COMMON: dict[str, Any] = {
    "event_id": EVENT_ID,
    "subject_id": "S-0001",
    "site_id": "SITE-A",
    "occurred_at": OCCURRED_AT,
}
COMMON_REQUIRED = ("event_id", "subject_id", "site_id", "occurred_at")


def _apply(msg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is DELETE:
            del msg[key]
        else:
            msg[key] = value
    return msg


def target_lesion(**overrides: Any) -> dict[str, Any]:
    """A valid target lesion (all fields spelled out), with fields overridden or deleted."""
    lesion: dict[str, Any] = {
        "lesion_id": "L1",
        "organ": "liver",
        "role": "target",
        "diameter_mm": 32.5,
        "lymph_node": False,
        "unequivocal_progression": False,
    }
    return _apply(lesion, overrides)


BODY: dict[str, dict[str, Any]] = {
    ENROLLMENT: {
        "arm": "sbrt",
        "first_line_regimen": "atezolizumab+bevacizumab",
        "age_years": 61,
        "kps": 90,
        "child_pugh_score": 6,
    },
    TREATMENT: {"kind": "second_line_start", "regimen": "lenvatinib"},
    LABS: {"analyte": "platelets", "value": 75, "unit": "10*9/L"},
    SCANS: {"scan_id": "SCAN-1", "timepoint": "baseline", "modality": "CT", "lesions": [target_lesion()]},
    ADVERSE_EVENTS: {"term": "Platelet count decreased", "grade": 3, "serious": False, "attribution": "possible"},
}
"""The topic-specific fields of a minimal valid message per input topic."""

# Required topic fields per the contract tables (those not marked optional, defaulted or kind-specific).
TOPIC_REQUIRED: dict[str, tuple[str, ...]] = {
    ENROLLMENT: ("arm", "first_line_regimen", "age_years", "kps", "child_pugh_score"),
    TREATMENT: ("kind",),
    LABS: ("analyte", "value", "unit"),
    SCANS: ("scan_id", "timepoint", "modality", "lesions"),
    ADVERSE_EVENTS: ("term", "grade", "serious", "attribution"),
}

MODEL: dict[str, type] = {
    ENROLLMENT: Enrollment,
    TREATMENT: Treatment,
    LABS: Lab,
    SCANS: Scan,
    ADVERSE_EVENTS: AdverseEvent,
}
INPUT_TOPICS = tuple(MODEL)
SHORT = {ENROLLMENT: "enrollment", TREATMENT: "treatment", LABS: "labs", SCANS: "scans", ADVERSE_EVENTS: "ae"}


def message(topic: str, **overrides: Any) -> dict[str, Any]:
    """A valid message of `topic`, with fields overridden (or deleted with `DELETE`)."""
    return _apply({**COMMON, **copy.deepcopy(BODY[topic])}, overrides)


def encode(msg: Any) -> bytes:
    return json.dumps(msg, ensure_ascii=False).encode("utf-8")


def decoded(topic: str, **overrides: Any) -> Any:
    """Decode a valid message of `topic` with overrides; fail the test if it is rejected."""
    result = decode(topic, encode(message(topic, **overrides)))
    assert not isinstance(result, Rejection), f"rejected: {result}"
    return result


def rejected(topic: str, payload: bytes) -> Rejection:
    result = decode(topic, payload)
    assert isinstance(result, Rejection), f"accepted: {result!r}"
    return result


def with_literal(topic: str, field: str, literal: str, **overrides: Any) -> bytes:
    """A message whose `field` is the raw JSON text `literal` (e.g. NaN, which json.dumps would not write)."""
    marker = "__LITERAL__"
    text = encode(message(topic, **{field: marker}, **overrides)).decode()
    assert text.count(f'"{marker}"') == 1
    return text.replace(f'"{marker}"', literal).encode()


def assert_rejected(result: Any, reason: str, field: str, event_id: str | None = EVENT_ID) -> None:
    """A rejection with `reason`, a detail naming `field`, carrying the payload's event_id."""
    assert isinstance(result, Rejection), f"accepted: {result!r}"
    assert reason == result.reason, result.detail
    assert field in result.detail, result.detail
    assert event_id == result.event_id


def case(case_id: str, topic: str, field: str, **overrides: Any) -> Any:
    return pytest.param(topic, overrides, field, id=case_id)


# --------------------------------------------------------------------------- valid messages


class TestValidMessageDecodesToItsTopicsModel:
    """A valid message of each input topic decodes to that topic's model, with its fields as sent."""

    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    def test_model(self, topic: str) -> None:
        assert MODEL[topic] is type(decoded(topic))

    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    def test_fields_survive(self, topic: str) -> None:
        sent = message(topic)
        dumped = decoded(topic).model_dump(mode="json")
        assert sent == {key: dumped[key] for key in sent}

    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    def test_optional_common_fields(self, topic: str) -> None:
        event = decoded(topic, recorded_at="2025-03-02T09:30:00+08:00", source="HIS-1")
        expected = (datetime(2025, 3, 2, 1, 30, tzinfo=UTC), "HIS-1")
        assert expected == (event.recorded_at, event.source)


class TestEveryContractEnumValueIsAccepted:
    """Every enumeration value the contract lists is accepted, spelled exactly as in the contract."""

    @pytest.mark.parametrize(
        ("topic", "overrides"),
        [
            *[pytest.param(ENROLLMENT, {"arm": arm}, id=f"arm-{arm}") for arm in ("sbrt", "control")],
            *[
                pytest.param(ENROLLMENT, {"first_line_regimen": r}, id=f"first_line-{r}")
                for r in ("atezolizumab+bevacizumab", "sintilimab+bevacizumab", "lenvatinib", "lenvatinib+pd1")
            ],
            *[
                pytest.param(TREATMENT, {"kind": "second_line_start", "regimen": r}, id=f"regimen-{r}")
                for r in ("lenvatinib", "regorafenib", "regorafenib+pd1")
            ],
            pytest.param(TREATMENT, {"kind": "sbrt_fraction", "fraction": 1, "dose_gy": 8.0}, id="kind-sbrt_fraction"),
            pytest.param(
                TREATMENT, {"kind": "sbrt_fraction", "fraction": 5, "dose_gy": 8}, id="kind-sbrt_fraction-int-dose"
            ),
            *[
                pytest.param(TREATMENT, {"kind": k, "regimen": DELETE}, id=f"kind-{k}")
                for k in ("sbrt_completed", "systemic_held", "systemic_resumed")
            ],
            *[
                pytest.param(TREATMENT, {"kind": "withdrawal", "regimen": DELETE, "reason": r}, id=f"reason-{r}")
                for r in ("progression", "toxicity", "consent_withdrawn", "other")
            ],
            pytest.param(
                TREATMENT,
                {"kind": "withdrawal", "regimen": DELETE, "reason": "other", "note": "moved abroad"},
                id="withdrawal-with-note",
            ),
            *[
                pytest.param(LABS, {"status": s}, id=f"status-{s}")
                for s in ("preliminary", "final", "corrected", "cancelled")
            ],
            *[pytest.param(SCANS, {"timepoint": t}, id=f"timepoint-{t}") for t in ("baseline", "follow_up")],
            *[pytest.param(SCANS, {"modality": m}, id=f"modality-{m}") for m in ("CT", "MRI", "PET-CT")],
            pytest.param(
                SCANS,
                {
                    "lesions": [
                        target_lesion(),
                        target_lesion(lesion_id="N1", organ="lymph node", diameter_mm=12, lymph_node=True),
                        target_lesion(lesion_id="L2", role="non_target", diameter_mm=DELETE),
                        target_lesion(
                            lesion_id="L3", role="non_target", diameter_mm=DELETE, unequivocal_progression=True
                        ),
                        target_lesion(lesion_id="L4", organ="lung", role="new", diameter_mm=DELETE),
                    ]
                },
                id="roles-target-non_target-new",
            ),
            pytest.param(SCANS, {"lesions": [target_lesion(diameter_mm=0)]}, id="target-disappeared-0mm"),
            pytest.param(SCANS, {"lesions": []}, id="no-lesions"),
            *[
                pytest.param(ADVERSE_EVENTS, {"attribution": a}, id=f"attribution-{a}")
                for a in ("unrelated", "unlikely", "possible", "probable", "definite")
            ],
            *[
                pytest.param(ADVERSE_EVENTS, {"attributed_to": a}, id=f"attributed_to-{'+'.join(a) or 'empty'}")
                for a in (["sbrt"], ["systemic"], ["sbrt", "systemic"])
            ],
            pytest.param(ADVERSE_EVENTS, {"serious": True, "ae_id": "AE-7"}, id="serious-with-ae_id"),
        ],
    )
    def test_accepted(self, topic: str, overrides: dict[str, Any]) -> None:
        assert MODEL[topic] is type(decoded(topic, **overrides))

    @pytest.mark.parametrize(
        ("analyte", "unit"),
        [
            ("platelets", "10*9/L"),
            ("neutrophils", "10*9/L"),
            ("wbc", "10*9/L"),
            ("hemoglobin", "g/L"),
            ("total_bilirubin", "umol/L"),
            ("alt", "U/L"),
            ("ast", "U/L"),
            ("alp", "U/L"),
            ("albumin", "g/L"),
            ("creatinine", "umol/L"),
            ("inr", "{INR}"),
            ("afp", "ng/mL"),
        ],
        ids=lambda v: v,
    )
    def test_every_analyte(self, analyte: str, unit: str) -> None:
        assert analyte == decoded(LABS, analyte=analyte, unit=unit, value=1).analyte


class TestBoundaryValuesAreAccepted:
    """Values at the edge of a contract range are still inside it."""

    @pytest.mark.parametrize(
        ("topic", "overrides"),
        [
            pytest.param(ENROLLMENT, {"kps": 0}, id="kps-0"),
            pytest.param(ENROLLMENT, {"kps": 100}, id="kps-100"),
            pytest.param(ENROLLMENT, {"child_pugh_score": 5}, id="child_pugh-5"),
            pytest.param(ENROLLMENT, {"child_pugh_score": 15}, id="child_pugh-15"),
            pytest.param(ADVERSE_EVENTS, {"grade": 1}, id="grade-1"),
            pytest.param(ADVERSE_EVENTS, {"grade": 5, "serious": True}, id="grade-5"),
            pytest.param(LABS, {"event_id": "e" * 128}, id="event_id-128-chars"),
            pytest.param(LABS, {"event_id": "e"}, id="event_id-1-char"),
            pytest.param(LABS, {"subject_id": "s" * 64}, id="subject_id-64-chars"),
            pytest.param(LABS, {"subject_id": "s"}, id="subject_id-1-char"),
            pytest.param(LABS, {"value": 0}, id="lab-value-0"),
            pytest.param(LABS, {"ref_low": 125, "ref_high": 350}, id="ref-range"),
            pytest.param(TREATMENT, {"kind": "sbrt_fraction", "fraction": 1, "dose_gy": 0.1}, id="fraction-1"),
        ],
    )
    def test_accepted(self, topic: str, overrides: dict[str, Any]) -> None:
        assert MODEL[topic] is type(decoded(topic, **overrides))


# --------------------------------------------------------------------------- rejections


class TestNotJson:
    """A value that is not JSON text (RFC 8259, UTF-8) is rejected as not_json, without an event_id."""

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"   ", id="whitespace"),
            pytest.param(b"{not json", id="garbage"),
            pytest.param(encode(message(LABS))[:-1], id="truncated-object"),
            pytest.param(encode(message(LABS)) + b"\n" + encode(message(LABS)), id="two-objects"),
            pytest.param(b"\xff\xfe\x00\x01", id="binary"),
            pytest.param(encode(message(LABS)).replace(b'"SITE-A"', b'"SITE-\xe9"'), id="latin1-byte-in-string"),
            pytest.param(json.dumps(message(LABS, site_id="Zürich")).encode("utf-16"), id="utf16-encoded"),
        ],
    )
    def test_rejected(self, payload: bytes) -> None:
        result = rejected(LABS, payload)
        expected = ("not_json", None)
        assert expected == (result.reason, result.event_id)


class TestNotAnObject:
    """JSON that is not an object is rejected as not_an_object."""

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"[1, 2]", id="array"),
            pytest.param(encode([message(LABS)]), id="array-of-valid-message"),
            pytest.param(b'"hello"', id="string"),
            pytest.param(encode(encode(message(LABS)).decode()), id="string-of-valid-message"),
            pytest.param(b"12", id="integer"),
            pytest.param(b"3.5", id="float"),
            pytest.param(b"true", id="bool"),
            pytest.param(b"null", id="null"),
        ],
    )
    def test_rejected(self, payload: bytes) -> None:
        result = rejected(LABS, payload)
        expected = ("not_an_object", None)
        assert expected == (result.reason, result.event_id)


class TestUnknownTopic:
    """Only the five v1 input topics are decoded; anything else, output topics included, is unknown_topic."""

    @pytest.mark.parametrize(
        "topic",
        [
            "trial.labs.v2",
            "trial.labs",
            "trial.lab.v1",
            "TRIAL.LABS.V1",
            "trial.adverse_events.v1",
            "trial.alerts.v1",
            "trial.alerts.masked.v1",
            "trial.deadletter.v1",
            "",
        ],
    )
    def test_rejected(self, topic: str) -> None:
        result = decode(topic, encode(message(LABS)))
        assert isinstance(result, Rejection), f"accepted: {result!r}"
        expected = "unknown_topic"
        assert expected == result.reason


class TestMissingField:
    """A message without one of its required fields is rejected as missing_field, naming the field."""

    @pytest.mark.parametrize(
        ("topic", "field"),
        [
            pytest.param(topic, field, id=f"{SHORT[topic]}-{field}")
            for topic in INPUT_TOPICS
            for field in (*COMMON_REQUIRED, *TOPIC_REQUIRED[topic])
        ],
    )
    def test_rejected(self, topic: str, field: str) -> None:
        result = decode(topic, encode(message(topic, **{field: DELETE})))
        assert_rejected(result, "missing_field", field, event_id=None if field == "event_id" else EVENT_ID)

    @pytest.mark.parametrize("field", ["lesion_id", "organ", "role"])
    def test_lesion_field(self, field: str) -> None:
        result = decode(SCANS, encode(message(SCANS, lesions=[target_lesion(**{field: DELETE})])))
        assert_rejected(result, "missing_field", field)


class TestWrongType:
    """A value of the wrong JSON type is rejected as wrong_type, not coerced."""

    @pytest.mark.parametrize(
        ("topic", "overrides", "field"),
        [
            # number sent as a string
            case("lab-value-as-string", LABS, "value", value="12"),
            case("kps-as-string", ENROLLMENT, "kps", kps="90"),
            case("age-as-string", ENROLLMENT, "age_years", age_years="61"),
            case("grade-as-string", ADVERSE_EVENTS, "grade", grade="3"),
            case("dose_gy-as-string", TREATMENT, "dose_gy", kind="sbrt_fraction", fraction=1, dose_gy="8"),
            case("ref_high-as-string", LABS, "ref_high", ref_high="350"),
            # bool sent as 0/1 (or as a string)
            case("serious-as-0", ADVERSE_EVENTS, "serious", serious=0),
            case("serious-as-1", ADVERSE_EVENTS, "serious", serious=1),
            case("serious-as-string", ADVERSE_EVENTS, "serious", serious="true"),
            case("lymph_node-as-1", SCANS, "lymph_node", lesions=[target_lesion(lymph_node=1)]),
            case(
                "unequivocal-as-0", SCANS, "unequivocal_progression", lesions=[target_lesion(unequivocal_progression=0)]
            ),
            # bool sent for a number
            case("lab-value-as-bool", LABS, "value", value=True),
            case("grade-as-bool", ADVERSE_EVENTS, "grade", grade=True),
            # integer field sent a fraction
            case("kps-3.5", ENROLLMENT, "kps", kps=3.5),
            case("age-61.5", ENROLLMENT, "age_years", age_years=61.5),
            case("child_pugh-6.5", ENROLLMENT, "child_pugh_score", child_pugh_score=6.5),
            case("grade-3.5", ADVERSE_EVENTS, "grade", grade=3.5),
            case("fraction-2.5", TREATMENT, "fraction", kind="sbrt_fraction", fraction=2.5, dose_gy=8),
            # string field sent a number
            case("event_id-as-number", LABS, "event_id", event_id=1234),
            case("subject_id-as-number", LABS, "subject_id", subject_id=1001),
            case("site_id-as-number", LABS, "site_id", site_id=7),
            case("unit-as-number", LABS, "unit", unit=1),
            case("term-as-number", ADVERSE_EVENTS, "term", term=42),
            case("scan_id-as-number", SCANS, "scan_id", scan_id=1),
            case("lesion_id-as-number", SCANS, "lesion_id", lesions=[target_lesion(lesion_id=1)]),
            # date-time sent as a number, arrays and objects confused
            case("occurred_at-epoch", LABS, "occurred_at", occurred_at=1740787200),
            case("lesions-as-object", SCANS, "lesions", lesions=target_lesion()),
            case("attributed_to-as-string", ADVERSE_EVENTS, "attributed_to", attributed_to="sbrt"),
        ],
    )
    def test_rejected(self, topic: str, overrides: dict[str, Any], field: str) -> None:
        result = decode(topic, encode(message(topic, **overrides)))
        expected_event_id = None if field == "event_id" else EVENT_ID
        assert_rejected(result, "wrong_type", field, event_id=expected_event_id)


class TestNaiveDatetime:
    """A date-time without a UTC offset is rejected as naive_datetime, in every topic."""

    @pytest.mark.parametrize(
        ("topic", "field", "value"),
        [
            pytest.param(topic, field, value, id=f"{SHORT[topic]}-{field}-{label}")
            for topic in INPUT_TOPICS
            for field in ("occurred_at", "recorded_at")
            for label, value in (("seconds", "2025-03-01T08:00:00"), ("fractional", "2025-03-01T08:00:00.250"))
        ],
    )
    def test_rejected(self, topic: str, field: str, value: str) -> None:
        result = decode(topic, encode(message(topic, **{field: value})))
        assert_rejected(result, "naive_datetime", field)


class TestNotADatetimeIsRejected:
    """Text that is not an RFC 3339 date-time is never accepted as one."""

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("2025-03-01", id="date-only"),
            pytest.param("01/03/2025 08:00", id="local-format"),
            pytest.param("2025-02-30T08:00:00+08:00", id="no-such-day"),
            pytest.param("", id="empty"),
        ],
    )
    def test_rejected(self, value: str) -> None:
        result = rejected(LABS, encode(message(LABS, occurred_at=value)))
        assert "occurred_at" in result.detail
        expected = EVENT_ID
        assert expected == result.event_id


class TestOffsetDatetimeAccepted:
    """RFC 3339 date-times with a numeric offset or Z are accepted, as the same instant, keeping their offset."""

    @pytest.mark.parametrize(
        ("text", "instant_utc", "offset_hours"),
        [
            pytest.param("2025-03-01T08:00:00+08:00", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), 8, id="plus-0800"),
            pytest.param("2025-03-01T00:00:00Z", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), 0, id="Z"),
            pytest.param("2025-03-01T00:00:00+00:00", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), 0, id="plus-0000"),
            pytest.param("2025-02-28T19:00:00-05:00", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), -5, id="minus-0500"),
            pytest.param(
                "2025-03-01T08:00:00.5+08:00", datetime(2025, 3, 1, 0, 0, 0, 500000, tzinfo=UTC), 8, id="fractional"
            ),
            pytest.param("2025-03-01t00:00:00z", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), 0, id="lowercase-t-z"),
        ],
    )
    @pytest.mark.parametrize("field", ["occurred_at", "recorded_at"])
    def test_accepted(self, field: str, text: str, instant_utc: datetime, offset_hours: int) -> None:
        value = getattr(decoded(LABS, **{field: text}), field)
        assert (instant_utc, timedelta(hours=offset_hours)) == (value, value.utcoffset())


class TestUnknownEnumValue:
    """A value outside a contract enumeration is rejected as unknown_enum_value, naming the field."""

    @pytest.mark.parametrize(
        ("topic", "overrides", "field"),
        [
            case("arm", ENROLLMENT, "arm", arm="experimental"),
            case("arm-wrong-case", ENROLLMENT, "arm", arm="SBRT"),
            case("first_line_regimen", ENROLLMENT, "first_line_regimen", first_line_regimen="sorafenib"),
            case("kind", TREATMENT, "kind", kind="sbrt_started"),
            case("regimen", TREATMENT, "regimen", regimen="sorafenib"),
            case("regimen-first-line-only", TREATMENT, "regimen", regimen="atezolizumab+bevacizumab"),
            case("reason", TREATMENT, "reason", kind="withdrawal", regimen=DELETE, reason="death"),
            case("analyte", LABS, "analyte", analyte="ggt"),
            case("status", LABS, "status", status="amended"),
            case("timepoint", SCANS, "timepoint", timepoint="screening"),
            case("modality", SCANS, "modality", modality="US"),
            case("role", SCANS, "role", lesions=[target_lesion(role="measurable")]),
            case("attribution", ADVERSE_EVENTS, "attribution", attribution="likely"),
            case("attributed_to-item", ADVERSE_EVENTS, "attributed_to", attributed_to=["surgery"]),
            case("attributed_to-second-item", ADVERSE_EVENTS, "attributed_to", attributed_to=["sbrt", "radiation"]),
        ],
    )
    def test_rejected(self, topic: str, overrides: dict[str, Any], field: str) -> None:
        result = decode(topic, encode(message(topic, **overrides)))
        assert_rejected(result, "unknown_enum_value", field)


class TestUnitMismatch:
    """A unit that does not fit the analyte is rejected as unit_mismatch, naming the unit."""

    @pytest.mark.parametrize(
        ("analyte", "unit"),
        [
            ("platelets", "g/L"),
            ("platelets", "g/l"),
            ("wbc", "umol/L"),
            ("neutrophils", "%"),
            ("hemoglobin", "10*9/L"),
            ("hemoglobin", "G/L"),
            ("total_bilirubin", "U/L"),
            ("total_bilirubin", "g/L"),
            ("creatinine", "g/dL"),
            ("albumin", "umol/L"),
            ("alt", "mg/dL"),
            ("ast", "umol/L"),
            ("alp", "g/L"),
            ("inr", "s"),
            ("afp", "U/L"),
            ("platelets", "furlongs"),
        ],
    )
    def test_rejected(self, analyte: str, unit: str) -> None:
        result = decode(LABS, encode(message(LABS, analyte=analyte, unit=unit)))
        assert_rejected(result, "unit_mismatch", "unit")


class TestInvalidValue:
    """A value of the right type outside what the contract allows is rejected as invalid_value, naming the field."""

    @pytest.mark.parametrize(
        ("topic", "overrides", "field"),
        [
            case("kps-101", ENROLLMENT, "kps", kps=101),
            case("kps-negative", ENROLLMENT, "kps", kps=-10),
            case("child_pugh-4", ENROLLMENT, "child_pugh_score", child_pugh_score=4),
            case("child_pugh-16", ENROLLMENT, "child_pugh_score", child_pugh_score=16),
            case("grade-0", ADVERSE_EVENTS, "grade", grade=0),
            case("grade-6", ADVERSE_EVENTS, "grade", grade=6),
            case("subject_id-empty", LABS, "subject_id", subject_id=""),
            case("subject_id-65-chars", LABS, "subject_id", subject_id="s" * 65),
            case("lab-value-negative", LABS, "value", value=-0.1),
            case("loinc-of-hemoglobin-for-platelets", LABS, "loinc", loinc="718-7"),
            case("loinc-garbage", LABS, "loinc", loinc="not-a-code"),
            case("diameter-negative", SCANS, "diameter_mm", lesions=[target_lesion(diameter_mm=-1)]),
        ],
    )
    def test_rejected(self, topic: str, overrides: dict[str, Any], field: str) -> None:
        result = decode(topic, encode(message(topic, **overrides)))
        assert_rejected(result, "invalid_value", field)

    @pytest.mark.parametrize("event_id", ["", "e" * 129], ids=["empty", "129-chars"])
    def test_event_id(self, event_id: str) -> None:
        result = decode(LABS, encode(message(LABS, event_id=event_id)))
        assert_rejected(result, "invalid_value", "event_id", event_id=event_id)


class TestKindSpecificFields:
    """Treatment and lesion fields the contract ties to a kind or role are required with it, and valid."""

    @pytest.mark.parametrize(
        ("topic", "overrides", "field"),
        [
            case("second_line_start-without-regimen", TREATMENT, "regimen", regimen=DELETE),
            case(
                "sbrt_fraction-without-fraction", TREATMENT, "fraction", kind="sbrt_fraction", regimen=DELETE, dose_gy=8
            ),
            case(
                "sbrt_fraction-without-dose_gy", TREATMENT, "dose_gy", kind="sbrt_fraction", regimen=DELETE, fraction=1
            ),
            case("withdrawal-without-reason", TREATMENT, "reason", kind="withdrawal", regimen=DELETE),
            case("target-lesion-without-diameter", SCANS, "diameter_mm", lesions=[target_lesion(diameter_mm=DELETE)]),
        ],
    )
    def test_missing(self, topic: str, overrides: dict[str, Any], field: str) -> None:
        result = decode(topic, encode(message(topic, **overrides)))
        assert_rejected(result, "missing_field", field)

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            pytest.param({"fraction": 1, "dose_gy": 0}, "dose_gy", id="dose_gy-0"),
            pytest.param({"fraction": 1, "dose_gy": -8}, "dose_gy", id="dose_gy-negative"),
            pytest.param({"fraction": 0, "dose_gy": 8}, "fraction", id="fraction-0"),
            pytest.param({"fraction": -1, "dose_gy": 8}, "fraction", id="fraction-negative"),
        ],
    )
    def test_invalid(self, overrides: dict[str, Any], field: str) -> None:
        result = decode(TREATMENT, encode(message(TREATMENT, kind="sbrt_fraction", regimen=DELETE, **overrides)))
        assert_rejected(result, "invalid_value", field)


class TestNonFiniteNumbers:
    """NaN and infinities are never accepted as a number (they are not JSON, nor a measurement)."""

    @pytest.mark.parametrize(
        ("topic", "field", "literal", "overrides"),
        [
            pytest.param(LABS, "value", "NaN", {}, id="value-NaN"),
            pytest.param(LABS, "value", "Infinity", {}, id="value-Infinity"),
            pytest.param(LABS, "value", "-Infinity", {}, id="value-minus-Infinity"),
            pytest.param(LABS, "value", "1e999", {}, id="value-overflow"),
            pytest.param(LABS, "ref_high", "Infinity", {}, id="ref_high-Infinity"),
            pytest.param(LABS, "ref_low", "NaN", {}, id="ref_low-NaN"),
            pytest.param(
                TREATMENT, "dose_gy", "NaN", {"kind": "sbrt_fraction", "fraction": 1, "regimen": DELETE}, id="dose-NaN"
            ),
        ],
    )
    def test_rejected(self, topic: str, field: str, literal: str, overrides: dict[str, Any]) -> None:
        result = rejected(topic, with_literal(topic, field, literal, **overrides))
        assert result.reason in {"not_json", "invalid_value"}, result.detail

    def test_nan_diameter(self) -> None:
        payload = encode(message(SCANS, lesions=[target_lesion(diameter_mm="__NAN__")])).replace(b'"__NAN__"', b"NaN")
        result = rejected(SCANS, payload)
        assert result.reason in {"not_json", "invalid_value"}, result.detail


class TestDecodeNeverRaises:
    """Whatever the bytes, decode answers with an event or a Rejection instead of raising."""

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"\x00", id="nul"),
            pytest.param(b"[" * 5000, id="deep-array"),
            pytest.param(b'{"a":' * 5000, id="deep-object"),
            pytest.param(b'{"event_id": "e1", "event_id": 5}', id="duplicate-key"),
            pytest.param(encode(message(LABS, value=10**400)), id="huge-integer"),
            pytest.param(b"\xef\xbb\xbf" + encode(message(LABS)), id="utf8-bom"),
        ],
    )
    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    def test_no_exception(self, topic: str, payload: bytes) -> None:
        result = decode(topic, payload)
        assert isinstance(result, Rejection | MODEL[topic])


class TestRejectionCarriesEventIdAndDetail:
    """A rejection of an object with a string event_id carries it; the detail names the offending field."""

    def test_event_id_carried(self) -> None:
        result = rejected(LABS, encode(message(LABS, event_id="lab-42", unit="g/L")))
        expected = "lab-42"
        assert expected == result.event_id

    def test_no_event_id_when_absent(self) -> None:
        result = rejected(LABS, encode(message(LABS, event_id=DELETE)))
        assert result.event_id is None

    def test_no_event_id_when_not_a_string(self) -> None:
        result = rejected(LABS, encode(message(LABS, event_id=42)))
        assert result.event_id is None

    def test_detail_names_nested_field(self) -> None:
        lesions = [target_lesion(), target_lesion(lesion_id="L2", diameter_mm="12")]
        result = rejected(SCANS, encode(message(SCANS, lesions=lesions)))
        expected = ("wrong_type", True, True)
        assert expected == (result.reason, "lesions" in result.detail, "diameter_mm" in result.detail)

    def test_errors_list_locates_field(self) -> None:
        result = rejected(ENROLLMENT, encode(message(ENROLLMENT, kps=101)))
        assert ["kps"] in [list(error["loc"]) for error in result.errors]


# --------------------------------------------------------------------------- defaults and tolerance


class TestDefaults:
    """Optional fields take the defaults the contract gives them."""

    def test_lab_status_defaults_to_final(self) -> None:
        expected = "final"
        assert expected == decoded(LABS).status

    def test_result_key_defaults_to_event_id(self) -> None:
        expected = EVENT_ID
        assert expected == decoded(LABS).result_key

    def test_result_key_is_result_id_when_given(self) -> None:
        expected = "R-9"
        assert expected == decoded(LABS, result_id=expected).result_key

    def test_ae_key_defaults_to_event_id(self) -> None:
        expected = EVENT_ID
        assert expected == decoded(ADVERSE_EVENTS).ae_key

    def test_ae_key_is_ae_id_when_given(self) -> None:
        expected = "AE-3"
        assert expected == decoded(ADVERSE_EVENTS, ae_id=expected).ae_key

    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    def test_recorded_or_occurred_at_falls_back_to_occurred_at(self, topic: str) -> None:
        event = decoded(topic)
        assert (None, event.occurred_at) == (event.recorded_at, event.recorded_or_occurred_at)

    def test_recorded_or_occurred_at_is_recorded_at_when_given(self) -> None:
        event = decoded(ADVERSE_EVENTS, recorded_at="2025-03-03T10:00:00+08:00")
        assert datetime(2025, 3, 3, 2, 0, tzinfo=UTC) == event.recorded_or_occurred_at

    def test_lesion_flags_default_to_false(self) -> None:
        lesion = target_lesion(lymph_node=DELETE, unequivocal_progression=DELETE)
        decoded_lesion = decoded(SCANS, lesions=[lesion]).lesions[0]
        expected = (False, False)
        assert expected == (decoded_lesion.lymph_node, decoded_lesion.unequivocal_progression)


class TestUnknownFieldsAreIgnored:
    """Additive v1 fields from newer publishers do not bounce the message."""

    @pytest.mark.parametrize("topic", INPUT_TOPICS, ids=SHORT.get)
    @pytest.mark.parametrize(
        "extra",
        [
            pytest.param({"priority": "routine"}, id="string"),
            pytest.param({"specimen": {"type": "serum", "tube": 3}}, id="object"),
            pytest.param({"tags": [1, "a", None]}, id="array"),
            pytest.param({"schema_version": None}, id="null"),
        ],
    )
    def test_top_level(self, topic: str, extra: dict[str, Any]) -> None:
        assert MODEL[topic] is type(decoded(topic, **extra))

    def test_in_lesion(self) -> None:
        scan = decoded(SCANS, lesions=[target_lesion(segment="VII", long_axis_mm=41.0)])
        expected = "L1"
        assert expected == scan.lesions[0].lesion_id
