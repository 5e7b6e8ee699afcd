"""The masked stream (`trial.alerts.masked.v1`): an allow-list of rules, fields and evidence keys.

Issue 10, defect 1: the projection was a deny-list (drop `arm`, drop some
rules), so an adverse event's `attributed_to: ["sbrt"]` went through to
blinded readers in the evidence. The property tests below check what
matters, that the blinded stream cannot tell the arms apart, by changing
everything that differs between the arms and requiring the masked output
not to change.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from tests.unit.test_demo_cohort import CATALOGUE
from trialwatch.cohort import generate
from trialwatch.contract import MASKED_EVIDENCE, AlertMessage, mask, reveals_arm
from trialwatch.demo import demo_cohort
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

CST = timezone(timedelta(hours=8))

# The contract's line for trial.alerts.masked.v1 names these as revealing the arm.
ARM_REVEALING_RULES = [
    "sbrt.window.at_risk",
    "sbrt.window.missed",
    "rild.suspected",
    "protocol.crossover",
    "protocol.systemic_held_during_sbrt",
    "dsmb.toxicity_boundary",
]


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


class TestRules:
    @pytest.mark.parametrize("rule", ARM_REVEALING_RULES)
    @pytest.mark.parametrize("status", ["firing", "resolved"])
    def test_arm_revealing_rules_are_dropped(self, rule: str, status: str) -> None:
        assert None is mask(alert(rule, status=status))

    @pytest.mark.parametrize("rule", ["sbrt.dose.high", "lab.new_rule", "", "ae.grade3plus.v2"])
    def test_a_rule_nobody_allow_listed_is_dropped(self, rule: str) -> None:
        # A deny-list lets a new rule through by default; the allow-list does not.
        assert (None, True) == (mask(alert(rule)), reveals_arm(rule))

    def test_every_catalogue_rule_is_decided(self) -> None:
        kept = sorted(r for r in CATALOGUE if not reveals_arm(r))
        assert sorted(set(CATALOGUE) - set(ARM_REVEALING_RULES)) == kept
        assert sorted(MASKED_EVIDENCE) == kept

    @pytest.mark.parametrize("rule", sorted(MASKED_EVIDENCE))
    def test_identity_and_clinical_fields_are_kept(self, rule: str) -> None:
        due = datetime(2025, 3, 3, 9, 0, tzinfo=CST)
        original = alert(rule, report_due_at=due)
        masked = mask(original)
        assert masked is not None
        keep = ("alert_id", "revision", "status", "rule", "severity", "subject_id", "site_id", "occurred_at")
        assert [getattr(original, f) for f in keep] == [getattr(masked, f) for f in keep]
        assert (3, due) == (masked.ctcae_grade, masked.report_due_at)


class TestEvidence:
    def test_an_unlisted_evidence_key_is_dropped(self) -> None:
        original = alert("lab.platelets.low", evidence={"value": 20.0, "fraction_dose_gy": 8.0, "sbrt": True})
        masked = mask(original)
        assert masked is not None
        assert {"value": 20.0} == masked.evidence

    def test_nested_keys_are_allow_listed_too(self) -> None:
        failures = [{"criterion": "kps", "value": 50, "allowed": ">= 70", "arm_note": "x"}]
        masked = mask(alert("eligibility.violation", evidence={"failures": failures}))
        assert masked is not None
        assert [{"criterion": "kps", "value": 50, "allowed": ">= 70"}] == masked.evidence["failures"]

    @pytest.mark.parametrize("rule", ["ae.grade3plus", "ae.serious"])
    def test_attribution_to_sbrt_and_the_sites_free_text_stay_off(
        self, make: EventFactory, apply_all: ApplyAll, rule: str
    ) -> None:
        # Defect 1, as reported: a masked ae.grade3plus carried evidence.attributed_to ["sbrt"].
        alerts = apply_all(
            [
                make.enrollment(arm="sbrt"),
                make.ae(grade=4, serious=True, term="Radiation dermatitis after SBRT", attributed_to=["sbrt"], day=2),
            ]
        )
        [dsmb] = [a for a in alerts if a.rule == rule]
        assert ["sbrt"] == dsmb.evidence["attributed_to"]
        masked = mask(dsmb)
        assert masked is not None
        text = masked.model_dump_json().lower()
        assert ("sbrt" not in text, "radiation" not in text) == (True, True)
        assert "attributed_to" not in masked.evidence


# --- The property: nothing that differs between the arms changes the masked stream. ---

Lines = list[dict[str, Any]]


def _flip_arm(lines: Lines) -> Lines:
    other = {"sbrt": "control", "control": "sbrt"}
    return [
        {**x, "value": {**x["value"], "arm": other[x["value"]["arm"]]}} if x["topic"] == "trial.enrollment.v1" else x
        for x in lines
    ]


def _without_sbrt_course(lines: Lines) -> Lines:
    course = ("sbrt_fraction", "sbrt_completed")
    return [x for x in lines if not (x["topic"] == "trial.treatment.v1" and x["value"]["kind"] in course)]


def _attributed_to(to: list[str] | None) -> Callable[[Lines], Lines]:
    def rewrite(lines: Lines) -> Lines:
        out = []
        for x in lines:
            if x["topic"] == "trial.adverse-events.v1":
                value = {k: v for k, v in x["value"].items() if k != "attributed_to"}
                x = {**x, "value": value if to is None else {**value, "attributed_to": to}}
            out.append(x)
        return out

    return rewrite


def _ids_that_say_sbrt(lines: Lines) -> Lines:
    """Every identifier a site makes up renamed to mention SBRT, as a site might for an SBRT subject."""
    out = []
    for x in lines:
        value = dict(x["value"])
        for key in ("event_id", "result_id", "ae_id", "scan_id"):
            if key in value:
                value[key] = f"{value[key]}-post-SBRT"
        if "lesions" in value:
            value["lesions"] = [{**les, "lesion_id": les["lesion_id"] + "-in-SBRT-field"} for les in value["lesions"]]
        out.append({**x, "value": value})
    return out


VARIANTS: dict[str, Callable[[Lines], Lines]] = {
    "ids-that-say-sbrt": _ids_that_say_sbrt,
    "arm-flipped": _flip_arm,
    "no-sbrt-course": _without_sbrt_course,
    "attributed-to-sbrt": _attributed_to(["sbrt"]),
    "attributed-to-systemic": _attributed_to(["systemic"]),
    "attributed-to-both": _attributed_to(["sbrt", "systemic"]),
    "no-attribution-target": _attributed_to(None),
}
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)


def _cohort() -> dict[str, Lines]:
    by_subject: dict[str, Lines] = defaultdict(list)
    lines = [json.loads(x) for x in demo_cohort(date(2025, 3, 1)).splitlines() if x.strip()]
    lines += list(generate(60, seed=11, start=date(2025, 1, 1)))
    for line in lines:
        by_subject[line["value"]["subject_id"]].append(line)
    return by_subject


COHORT = _cohort()
_BASELINE: dict[str, tuple[list[str], set[str]]] = {}


def _baseline(subject: str) -> tuple[list[str], set[str]]:
    if subject not in _BASELINE:
        _BASELINE[subject] = _masked_stream(COHORT[subject])
    return _BASELINE[subject]


def _masked_stream(lines: Lines) -> tuple[list[str], set[str]]:
    """The subject's masked messages (raised_at aside: the replay clock), and every DSMB rule that fired."""
    replay = Replay(Engine(load_protocol()))
    alerts: list[AlertMessage] = []
    for _, event in read_event_file(json.dumps(x) for x in lines):
        assert not isinstance(event, BadLine), event
        alerts += replay.apply(event)
    alerts += replay.finish(AS_OF)
    masked = [m.model_dump(mode="json", exclude={"raised_at"}) for a in alerts if (m := mask(a)) is not None]
    # An alert id is a hash of the opening event's id: opaque, but another id
    # for another event id. Compared by order of first appearance instead.
    order: dict[str, str] = {}
    for m in masked:
        m["alert_id"] = order.setdefault(m["alert_id"], f"alert-{len(order)}")
    return [json.dumps(m, sort_keys=True) for m in masked], {a.rule for a in alerts}


def test_the_cohort_covers_both_arms_and_every_rule() -> None:
    arms = {x["value"]["arm"] for lines in COHORT.values() for x in lines if x["topic"] == "trial.enrollment.v1"}
    fired: set[str] = set()
    for subject in COHORT:
        fired |= _baseline(subject)[1]
    assert {"sbrt", "control"} == arms
    assert set(CATALOGUE) - {"dsmb.toxicity_boundary"} <= fired


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_masked_stream_cannot_tell_the_arms_apart(variant: str) -> None:
    changed = []
    for subject, lines in COHORT.items():
        before, _ = _baseline(subject)
        after, _ = _masked_stream(VARIANTS[variant](lines))
        if before != after:
            changed.append((subject, sorted(set(before) ^ set(after))[:2]))
    assert [] == changed[:3]


def test_the_property_sees_a_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property is not vacuous: put attributed_to back on the allow-list and it fails."""
    leaky = {**MASKED_EVIDENCE, "ae.grade3plus": {**MASKED_EVIDENCE["ae.grade3plus"], "attributed_to": True}}
    monkeypatch.setattr("trialwatch.contract.MASKED_EVIDENCE", leaky)
    subject = next(s for s, lines in COHORT.items() if any(x["value"].get("attributed_to") for x in lines))
    lines = COHORT[subject]
    assert _masked_stream(lines)[0] != _masked_stream(_attributed_to(["sbrt"])(lines))[0] or (
        _masked_stream(lines)[0] != _masked_stream(_attributed_to(["systemic"])(lines))[0]
    )
