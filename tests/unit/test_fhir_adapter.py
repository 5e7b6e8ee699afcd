"""FHIR R4 Observation and AdverseEvent to contract events: resources, NDJSON and Bundles."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_hl7_adapter import MAPPING
from trialwatch.adapters.fhir_r4 import CTCAE_GRADE_EXTENSION, MAX_DOCUMENT_CHARS, FhirOutcome, map_fhir
from trialwatch.cli import main
from trialwatch.contract import AdverseEvent, Lab

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "obs-plt-1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "777-3", "display": "Platelets"}]},
    "subject": {"reference": "Patient/MRN0001"},
    "effectiveDateTime": "2025-03-05T08:00:00+08:00",
    "issued": "2025-03-05T10:00:00+08:00",
    "valueQuantity": {"value": 20, "unit": "10^9/L", "system": "http://unitsofmeasure.org", "code": "10*9/L"},
    "referenceRange": [
        {"low": {"value": 125, "code": "10*9/L", "system": "http://unitsofmeasure.org"}, "high": {"value": 350}}
    ],
}

ADVERSE_EVENT: dict[str, Any] = {
    "resourceType": "AdverseEvent",
    "id": "ae-77",
    "actuality": "actual",
    "extension": [{"url": CTCAE_GRADE_EXTENSION, "valueInteger": 4}],
    "event": {"coding": [{"system": "http://ncicb.nci.nih.gov/ctcae", "display": "Platelet count decreased"}]},
    "subject": {"identifier": {"system": "urn:hospital:mrn", "value": "MRN0001"}},
    "date": "2025-03-05T09:00:00+08:00",
    "recordedDate": "2025-03-05T11:00:00+08:00",
    "seriousness": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness", "code": "serious"}]
    },
    "suspectEntity": [
        {
            "instance": {"reference": "Medication/regorafenib"},
            "causality": [{"assessment": {"coding": [{"code": "Possible"}]}}],
        },
        {
            "instance": {"reference": "Procedure/sbrt"},
            "causality": [{"assessment": {"coding": [{"code": "Probably-Likely"}]}}],
        },
    ],
}


def changed(resource: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    for name, value in fields.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def one(resource: dict[str, Any]) -> FhirOutcome:
    outcomes = map_fhir(json.dumps(resource), MAPPING)
    assert 1 == len(outcomes)
    return outcomes[0]


def lab_of(resource: dict[str, Any]) -> Lab:
    outcome = one(resource)
    assert isinstance(outcome.event, Lab), outcome.reason
    return outcome.event


def ae_of(resource: dict[str, Any]) -> AdverseEvent:
    outcome = one(resource)
    assert isinstance(outcome.event, AdverseEvent), outcome.reason
    return outcome.event


class TestObservation:
    """An Observation with a LOINC code and a UCUM quantity is a lab event."""

    def test_platelets(self) -> None:
        lab = lab_of(OBSERVATION)
        assert ("TW-101", "SITE-GZ", "platelets", "777-3") == (lab.subject_id, lab.site_id, lab.analyte, lab.loinc)
        assert (20.0, "10*9/L", 125.0, 350.0, "final") == (lab.value, lab.unit, lab.ref_low, lab.ref_high, lab.status)
        assert "2025-03-05T08:00:00+08:00" == lab.occurred_at.isoformat()
        assert lab.recorded_at is not None
        assert "2025-03-05T10:00:00+08:00" == lab.recorded_at.isoformat()
        assert "fhir:Observation/obs-plt-1" == lab.result_id

    def test_conventional_units(self) -> None:
        bilirubin = changed(
            OBSERVATION,
            code={"coding": [{"system": "http://loinc.org", "code": "1975-2"}]},
            valueQuantity={"value": 3.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
            referenceRange=[{"high": {"value": 1.2, "unit": "mg/dL"}}],
        )
        lab = lab_of(bilirubin)
        assert ("total_bilirubin", 3.2, "mg/dL", None, 1.2) == (
            lab.analyte,
            lab.value,
            lab.unit,
            lab.ref_low,
            lab.ref_high,
        )

    def test_local_code(self) -> None:
        local = changed(OBSERVATION, code={"coding": [{"system": "urn:lis:gzh", "code": "PLT"}]})
        lab = lab_of(local)
        assert ("platelets", None) == (lab.analyte, lab.loinc)

    @pytest.mark.parametrize(("fhir_status", "status"), [("amended", "corrected"), ("entered-in-error", "cancelled")])
    def test_later_versions_keep_the_result_id(self, fhir_status: str, status: str) -> None:
        first = lab_of(OBSERVATION)
        later = lab_of(changed(OBSERVATION, status=fhir_status, meta={"versionId": "2"}))
        assert (status, first.result_id) == (later.status, later.result_id)
        assert first.event_id != later.event_id

    def test_the_same_resource_twice_is_the_same_event(self) -> None:
        assert lab_of(OBSERVATION).event_id == lab_of(copy.deepcopy(OBSERVATION)).event_id

    def test_ignored_code_is_skipped(self) -> None:
        sodium = changed(OBSERVATION, code={"coding": [{"system": "http://loinc.org", "code": "2951-2"}]})
        outcome = one(sodium)
        assert (True, None) == (outcome.skipped, outcome.event)

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"code": {"coding": [{"system": "http://loinc.org", "code": "9999-9"}]}}, "unknown observation code"),
            ({"subject": {"reference": "Patient/MRN0999"}}, "patient not enrolled"),
            ({"effectiveDateTime": "2025-03-05"}, "date without a time"),
            ({"status": "registered"}, "carries no result"),
            ({"valueQuantity": None}, "valueQuantity.value is missing"),
            (
                {
                    "valueQuantity": {"value": 20, "code": "g/L", "system": "http://unitsofmeasure.org"},
                    "referenceRange": None,
                },
                "does not fit",
            ),
            ({"valueQuantity": {"value": 5, "comparator": "<", "code": "10*9/L"}}, "comparator"),
            ({"referenceRange": [{"low": {"value": 1, "code": "g/L"}}]}, "another unit"),
            ({"valueString": "low", "valueQuantity": None}, "valueQuantity.value is missing"),
            ({"bogusElement": 1}, "not a valid FHIR R4 Observation"),
        ],
    )
    def test_rejected_with_a_reason(self, fields: dict[str, Any], expected: str) -> None:
        outcome = one(changed(OBSERVATION, **fields))
        assert outcome.rejected
        assert expected in outcome.reason
        assert "MRN0999" not in outcome.reason

    def test_cancelled_without_value_is_rejected_and_says_why(self) -> None:
        outcome = one(changed(OBSERVATION, status="cancelled", valueQuantity=None))
        assert outcome.rejected
        assert "cancelled" in outcome.reason


class TestAdverseEvent:
    """An AdverseEvent with a grade, seriousness and causality is an adverse-event event."""

    def test_grade_from_extension_and_strongest_causality(self) -> None:
        ae = ae_of(ADVERSE_EVENT)
        assert ("TW-101", "Platelet count decreased", 4, True, "probable") == (
            ae.subject_id,
            ae.term,
            ae.grade,
            ae.serious,
            ae.attribution,
        )
        assert "2025-03-05T09:00:00+08:00" == ae.occurred_at.isoformat()
        assert ae.recorded_at is not None
        assert "2025-03-05T11:00:00+08:00" == ae.recorded_at.isoformat()
        assert "fhir:AdverseEvent/ae-77" == ae.ae_id

    @pytest.mark.parametrize(("severity", "grade"), [("mild", 1), ("moderate", 2), ("severe", 3)])
    def test_grade_from_coded_severity(self, severity: str, grade: int) -> None:
        resource = changed(ADVERSE_EVENT, extension=None, severity={"coding": [{"code": severity}]})
        assert grade == ae_of(resource).grade

    def test_non_serious_and_who_umc_certain(self) -> None:
        resource = changed(
            ADVERSE_EVENT,
            seriousness={"coding": [{"code": "non-serious"}]},
            suspectEntity=[
                {"instance": {"reference": "Medication/x"}, "causality": [{"assessment": {"text": "Certain"}}]}
            ],
        )
        ae = ae_of(resource)
        assert (False, "definite") == (ae.serious, ae.attribution)

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"extension": None}, "no CTCAE grade"),
            ({"extension": [{"url": CTCAE_GRADE_EXTENSION, "valueInteger": 7}]}, "valueInteger 1 to 5"),
            ({"seriousness": None}, "seriousness is missing"),
            ({"suspectEntity": None}, "attribution is required"),
            ({"actuality": "potential"}, "only actual"),
            ({"date": "2025-03-05"}, "date without a time"),
            ({"subject": {"reference": "Patient/MRN0999"}}, "patient not enrolled"),
            ({"event": None}, "no CTCAE term"),
            ({"resultingEffect": [{"reference": "Condition/x"}]}, "not a valid FHIR R4 AdverseEvent"),
        ],
    )
    def test_rejected_with_a_reason(self, fields: dict[str, Any], expected: str) -> None:
        outcome = one(changed(ADVERSE_EVENT, **fields))
        assert outcome.rejected
        assert expected in outcome.reason


class TestContainers:
    """Bundles and NDJSON carry several resources; each gets its own outcome."""

    def test_bundle_resolves_subject_through_its_patient_entry(self) -> None:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": "urn:uuid:0f9a7c34-0000-4000-8000-000000000001",
                    "resource": {
                        "resourceType": "Patient",
                        "id": "p1",
                        "identifier": [{"system": "urn:hospital:mrn", "value": "MRN0002"}],
                    },
                },
                {
                    "fullUrl": "urn:uuid:0f9a7c34-0000-4000-8000-000000000002",
                    "resource": changed(
                        OBSERVATION, id=None, subject={"reference": "urn:uuid:0f9a7c34-0000-4000-8000-000000000001"}
                    ),
                },
                {"resource": ADVERSE_EVENT},
            ],
        }
        outcomes = map_fhir(json.dumps(bundle), MAPPING)
        assert [True, False, False] == [o.skipped for o in outcomes]
        assert "MRN0002" not in outcomes[0].where + outcomes[0].reason
        lab, ae = outcomes[1].event, outcomes[2].event
        assert isinstance(lab, Lab)
        assert isinstance(ae, AdverseEvent)
        assert ("TW-102", "TW-101") == (lab.subject_id, ae.subject_id)
        assert "fhir:urn:uuid:0f9a7c34-0000-4000-8000-000000000002" == lab.result_id

    def test_ndjson_reports_each_line(self) -> None:
        text = "\n".join([json.dumps(OBSERVATION), "{not json", "", json.dumps(ADVERSE_EVENT), "[1]"])
        outcomes = map_fhir(text, MAPPING)
        assert ["line 1", "line 2", "line 4", "line 5"] == [" ".join(o.where.split(" ")[:2]) for o in outcomes]
        assert [False, True, False, True] == [o.rejected for o in outcomes]

    def test_a_lone_unsupported_resource_is_rejected_without_its_id(self) -> None:
        outcome = one({"resourceType": "Patient", "id": "MRN0001"})
        assert outcome.rejected
        assert "MRN0001" not in outcome.where + outcome.reason


def bundle_of(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


class TestHostileDocuments:
    """Issue 10, defect 8: every document is mapped or refused with a reason; nothing raises."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ('{"resourceType": "Observation", "valueQuantity": {"value": ' + "9" * 5_000 + "}}", "number"),
            ('{"resourceType": "Observation", "id": ' + "1" * 5_000 + "}", "number"),
            ("[" * 100_000, "nested"),
            ('{"a":' * 100_000, "nested"),
            ('{"resourceType": "Observation", "valueQuantity": {"value": NaN}}', "not JSON"),
            ('{"resourceType": "Observation", "status": "final", "status": "cancelled"}', "twice"),
        ],
        ids=["5000-digit value", "5000-digit id", "deep arrays", "deep objects", "NaN", "duplicate key"],
    )
    def test_refused_with_a_reason(self, text: str, expected: str) -> None:
        outcomes = map_fhir(text, MAPPING)
        assert 1 == len(outcomes)
        assert outcomes[0].rejected
        assert expected in outcomes[0].reason

    def test_a_patient_with_malformed_identifiers_does_not_stop_the_bundle(self) -> None:
        patient = {"resourceType": "Patient", "id": "p1", "identifier": 5}
        outcomes = map_fhir(json.dumps(bundle_of(patient, OBSERVATION)), MAPPING)
        assert [True, False] == [o.skipped for o in outcomes]
        assert isinstance(outcomes[1].event, Lab)

    @pytest.mark.parametrize(
        "patient",
        [
            {"resourceType": "Patient", "id": "p1", "identifier": [5, {"value": 7}, {"value": ["MRN0001"]}]},
            {"resourceType": "Patient", "id": 5, "identifier": "MRN0001"},
        ],
    )
    def test_malformed_patient_identifiers_name_nobody(self, patient: dict[str, Any]) -> None:
        lab = changed(OBSERVATION, subject={"reference": "Patient/p1"})
        outcomes = map_fhir(json.dumps(bundle_of(patient, lab)), MAPPING)
        assert "patient not enrolled" in outcomes[1].reason

    @pytest.mark.parametrize(
        "fields",
        [
            {"subject": 5},
            {"subject": {"reference": 5}},
            {"code": {"coding": 5}},
            {"valueQuantity": {"value": 10**400, "code": "10*9/L"}},
            {"meta": {"versionId": 5}},
            {"referenceRange": [5]},
        ],
    )
    def test_wrong_shapes_in_an_observation(self, fields: dict[str, Any]) -> None:
        assert one(changed(OBSERVATION, **fields)).rejected

    def test_an_over_long_term_is_refused_rather_than_published(self) -> None:
        outcome = one(changed(ADVERSE_EVENT, event={"text": "x" * 600_000}))
        assert outcome.rejected
        assert "AdverseEvent.event" in outcome.reason
        assert len(outcome.reason) < 1_000

    def test_a_long_code_is_not_echoed_whole(self) -> None:
        outcome = one(changed(OBSERVATION, code={"coding": [{"system": "urn:x", "code": "C" * 600_000}]}))
        assert "unknown observation code" in outcome.reason
        assert len(outcome.reason) < 1_000


class TestNdjsonLineByLine:
    """Issue 10, defect 11: one bad NDJSON line is refused with its number; the others go on."""

    def test_a_deeply_nested_line(self) -> None:
        deep = "[" * 50_000 + "]" * 50_000
        outcomes = map_fhir("\n".join([json.dumps(OBSERVATION), deep, json.dumps(ADVERSE_EVENT)]), MAPPING)
        assert ["line 1", "line 2", "line 3"] == [" ".join(o.where.split(" ")[:2]) for o in outcomes]
        assert [Lab, type(None), AdverseEvent] == [type(o.event) for o in outcomes]
        assert "nested" in outcomes[1].reason

    def test_an_over_long_line(self) -> None:
        huge = json.dumps(changed(OBSERVATION, text={"status": "generated", "div": "x" * (MAX_DOCUMENT_CHARS + 1)}))
        outcomes = map_fhir("\n".join([huge, json.dumps(ADVERSE_EVENT)]), MAPPING)
        assert [True, False] == [o.rejected for o in outcomes]
        assert "line 1" == outcomes[0].where
        assert "characters" in outcomes[0].reason

    def test_a_line_that_is_not_utf8(self) -> None:
        data = b"\n".join(
            [json.dumps(OBSERVATION).encode(), b'{"resourceType": "\xff"}', json.dumps(ADVERSE_EVENT).encode()]
        )
        outcomes = map_fhir(data, MAPPING)
        assert [Lab, type(None), AdverseEvent] == [type(o.event) for o in outcomes]
        assert "not UTF-8" in outcomes[1].reason

    def test_lines_end_at_newline_only(self) -> None:
        # U+2028 may stand unescaped in a JSON string; str.splitlines() would cut the line there.
        noted = json.dumps(changed(OBSERVATION, note=[{"text": "see\u2028below"}]), ensure_ascii=False)
        outcomes = map_fhir("\n".join([noted, json.dumps(ADVERSE_EVENT)]), MAPPING)
        assert [Lab, AdverseEvent] == [type(o.event) for o in outcomes]

    def test_a_pretty_printed_document_is_refused_once(self) -> None:
        text = json.dumps(changed(OBSERVATION, valueQuantity={"value": 1e999}), indent=2).replace("Infinity", "1e999")
        outcomes = map_fhir(text, MAPPING)
        assert [("resource", True)] == [(o.where, o.rejected) for o in outcomes]
        assert "out of range" in outcomes[0].reason

    def test_the_command_sends_the_other_lines(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        mapping = tmp_path / "mapping.toml"
        mapping.write_text('site_id = "SITE-GZ"\n[subjects]\nMRN0001 = "TW-101"\n')
        path = tmp_path / "in.ndjson"
        path.write_text("\n".join([json.dumps(OBSERVATION), "[" * 50_000, json.dumps(ADVERSE_EVENT)]) + "\n")
        caplog.set_level(logging.DEBUG)

        code = main(["fhir", str(path), "--mapping", str(mapping), "--dry-run"])

        out, err = capsys.readouterr()
        assert 1 == code
        assert ["trial.labs.v1", "trial.adverse-events.v1"] == [json.loads(line)["topic"] for line in out.splitlines()]
        assert "line 2: rejected: " in err
        assert "Traceback" not in err
        assert "MRN0001" not in out + err + caplog.text


class TestNoRecordNumberAnywhere:
    """Issue 10: nothing the adapter or its libraries log or report carries a record number."""

    MRN = "MRN8675309"

    def documents(self) -> list[str]:
        mrn = self.MRN
        patient = {"resourceType": "Patient", "id": mrn, "identifier": [{"value": mrn}, {"value": 5}]}
        subjects = [
            {"reference": f"Patient/{mrn}"},
            {"identifier": {"value": mrn}},
            {"identifier": {"value": mrn, "period": mrn}},
            {"reference": f"Patient/{mrn}", "display": 5},
            {"reference": [mrn]},
            {"identifier": mrn},
        ]
        resources: list[dict[str, Any]] = [patient, {**patient, "identifier": mrn}]
        for subject in subjects:
            resources += [changed(OBSERVATION, subject=subject), changed(ADVERSE_EVENT, subject=subject)]
        texts = [json.dumps(r) for r in resources]
        return [*texts, json.dumps(bundle_of(*resources)), "\n".join(texts), f'{{"id": "{mrn}", "id": 1}}']

    def test_not_in_logs_outcomes_or_output(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        shown = []
        for text in self.documents():
            shown += [f"{o.where} {o.reason}" for o in map_fhir(text, MAPPING)]
        out, err = capsys.readouterr()
        assert len(shown) > 20
        assert [] == [line for line in shown if self.MRN in line]
        assert self.MRN not in out + err + caplog.text
