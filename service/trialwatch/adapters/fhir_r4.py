"""FHIR R4 Observation and AdverseEvent to contract v1 events: a pure mapping over parsed JSON.

Resources are validated with fhir.resources' R4B models. Its default package
is R5, whose AdverseEvent has no `severity` and a different `causality`, so
R4 data would be refused or lost there; R4B (4.3) keeps R4's Observation and
AdverseEvent unchanged, and fhir.resources 8 ships it on pydantic v2. The
package no longer ships an R4 (4.0.1) module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir.resources.R4B.adverseevent import AdverseEvent as FhirAdverseEvent
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.reference import Reference
from pydantic import ValidationError

from trialwatch.adapters.mapping import AdapterMapping, AmbiguousSubject
from trialwatch.contract import ADVERSE_EVENTS, LABS, AdverseEvent, InputEvent, Lab
from trialwatch.decode import Rejection, decode
from trialwatch.units import ucum

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# No standard FHIR element holds a CTCAE grade; this is the extension this
# adapter reads (valueInteger 1-5), on the AdverseEvent or on its severity.
CTCAE_GRADE_EXTENSION = "https://trialwatch.invalid/fhir/StructureDefinition/ctcae-grade"

# R4 adverse-event-severity. CTCAE's own general definitions: grade 1 is mild,
# 2 moderate, 3 severe. "severe" is therefore grade 3, a floor: a
# life-threatening (4) or fatal (5) event needs the extension to be graded so.
GRADE_BY_SEVERITY: dict[str, int] = {"mild": 1, "moderate": 2, "severe": 3}

# R4 adverse-event-causality-assess (WHO-UMC), and the contract's own words.
ATTRIBUTION_BY_CAUSALITY: dict[str, str] = {
    "certain": "definite",
    "probably-likely": "probable",
    "possible": "possible",
    "unlikely": "unlikely",
    **{word: word for word in ("unrelated", "unlikely", "possible", "probable", "definite")},
}
# Strongest first: when several suspect entities are assessed, the event is
# reported with its strongest attribution (safety first).
ATTRIBUTION_ORDER = ("definite", "probable", "possible", "unlikely", "unrelated")

# Observation.status to the contract's lab status. amended is a correction
# after final; entered-in-error withdraws the result, like a cancellation.
STATUS_BY_OBSERVATION: dict[str, str] = {
    "preliminary": "preliminary",
    "final": "final",
    "amended": "corrected",
    "corrected": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "cancelled",
}

MAPPED = ("Observation", "AdverseEvent")


@dataclass(frozen=True)
class FhirOutcome:
    """One resource's fate: an event, a rejection with a reason, or skipped (not a resource we map)."""

    where: str
    event: InputEvent | None = None
    reason: str = ""
    skipped: bool = False

    @property
    def rejected(self) -> bool:
        return self.event is None and not self.skipped


class _Refused(Exception):
    pass


def map_fhir(text: str, mapping: AdapterMapping) -> list[FhirOutcome]:
    """Map a single resource, a Bundle, or NDJSON (one resource a line) to events, one outcome per resource."""
    outcomes: list[FhirOutcome] = []
    for where, item in _documents(text):
        if isinstance(item, str):
            outcomes.append(FhirOutcome(where, reason=item))
        elif item.get("resourceType") == "Bundle":
            outcomes.extend(_bundle(item, mapping, where))
        else:
            outcomes.append(_resource(item, mapping, where, {}, None, in_bundle=False))
    return outcomes


def _documents(text: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    try:
        whole = json.loads(text)
    except ValueError:
        pass
    else:
        yield "resource", whole if isinstance(whole, dict) else f"a JSON {type(whole).__name__}, not a resource"
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {number}", f"not JSON: {exc.msg}"
            continue
        yield f"line {number}", item if isinstance(item, dict) else f"a JSON {type(item).__name__}, not a resource"


def _bundle(bundle: dict[str, Any], mapping: AdapterMapping, where: str) -> list[FhirOutcome]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return [FhirOutcome(where, reason="Bundle.entry is not a list")]
    # Observations in a transaction Bundle often point at a Patient entry of
    # the same Bundle (by fullUrl or Patient/id); its identifiers name them.
    patients: dict[str, list[str]] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            identifiers = [i.get("value") for i in resource.get("identifier") or [] if isinstance(i, dict)]
            values = [v for v in identifiers if isinstance(v, str)]
            if isinstance(entry.get("fullUrl"), str):
                patients[entry["fullUrl"]] = values
            if isinstance(resource.get("id"), str):
                patients[f"Patient/{resource['id']}"] = values
    outcomes = []
    for number, entry in enumerate(entries, start=1):
        at = f"{where} entry {number}"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            outcomes.append(FhirOutcome(at, reason="entry has no resource"))
            continue
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        outcomes.append(_resource(resource, mapping, at, patients, full_url, in_bundle=True))
    return outcomes


def _resource(
    raw: dict[str, Any],
    mapping: AdapterMapping,
    where: str,
    patients: dict[str, list[str]],
    full_url: str | None,
    *,
    in_bundle: bool,
) -> FhirOutcome:
    kind = raw.get("resourceType")
    if kind not in MAPPED:
        # The type alone: a Patient's id may be a record number.
        label = f"{where} ({kind})" if isinstance(kind, str) else where
        if isinstance(kind, str) and in_bundle:
            # A Bundle carries Patients, Encounters, ... alongside what we map.
            return FhirOutcome(label, skipped=True, reason=f"{kind} is not mapped (only Observation, AdverseEvent)")
        return FhirOutcome(label, reason=f"resourceType {kind!r} is not Observation or AdverseEvent")
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    label = f"{where} {kind}/{rid}" if rid else f"{where} {kind}"
    try:
        if kind == "Observation":
            event: InputEvent | None = _observation(raw, mapping, patients, full_url)
        else:
            event = _adverse_event(raw, mapping, patients, full_url)
    except _Refused as refused:
        return FhirOutcome(label, reason=str(refused))
    if event is None:
        return FhirOutcome(label, skipped=True, reason="observation code is in ignore_codes")
    return FhirOutcome(label, event)


def _validated(model: type[Observation] | type[FhirAdverseEvent], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # No input values: a subject reference or identifier may be in them.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(resource)'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise _Refused(f"not a valid FHIR R4 {model.__name__}: {problems}") from None


def _subject(reference: Reference | None, mapping: AdapterMapping, patients: dict[str, list[str]], kind: str) -> str:
    if reference is None:
        raise _Refused(f"{kind}.subject is missing")
    identifiers: list[str] = []
    if reference.identifier is not None and reference.identifier.value:
        identifiers.append(reference.identifier.value)
    if reference.reference:
        if reference.reference in patients:
            identifiers.extend(patients[reference.reference])
        elif reference.reference.startswith("Patient/"):
            identifiers.append(reference.reference.removeprefix("Patient/"))
    try:
        subject = mapping.subject_for(identifiers)
    except AmbiguousSubject:
        raise _Refused(f"{kind}.subject maps to more than one trial subject; fix the mapping file") from None
    if subject is None:
        raise _Refused(f"patient not enrolled: {kind}.subject is not in the mapping file")
    return subject


def _identity(raw: dict[str, Any], kind: str, full_url: str | None) -> tuple[str | None, str]:
    """The resource's stable id (across versions) and an event id unique to this version of it."""
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    stable = f"fhir:{kind}/{rid}" if rid else (f"fhir:{full_url}" if full_url else None)
    meta = raw.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    version = version if isinstance(version, str) else None
    if stable and version:
        event_id = f"{stable}/_history/{version}"
    else:
        # Without a version id, the content decides: the same resource sent
        # twice is one event; a changed one is a new event of the same result.
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:20]
        event_id = f"{stable or 'fhir:' + kind}/{digest}"
    if len(event_id) > 128:
        event_id = f"fhir:{kind}/" + hashlib.sha256(event_id.encode()).hexdigest()[:40]
    if stable and len(stable) > 128:
        stable = f"fhir:{kind}/" + hashlib.sha256(stable.encode()).hexdigest()[:40]
    return stable, event_id


def _time(value: datetime | date | str | None, name: str) -> str:
    if value is None:
        raise _Refused(f"{name} is missing")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise _Refused(f"{name} has no UTC offset")
        return value.isoformat()
    raise _Refused(f"{name} {str(value)!r} is a date without a time; contract v1 needs a date-time with offset")


def _validate_event(topic: str, value: dict[str, Any]) -> InputEvent:
    event = decode(topic, json.dumps(value).encode())
    if isinstance(event, Rejection):
        raise _Refused(f"{event.reason}: {event.detail}")
    return event


def _observation(
    raw: dict[str, Any], mapping: AdapterMapping, patients: dict[str, list[str]], full_url: str | None
) -> Lab | None:
    obs: Observation = _validated(Observation, raw)
    analyte, loinc, ignored = None, None, False
    for coding in obs.code.coding or []:
        if not coding.code:
            continue
        found = mapping.analyte_for(coding.code, coding.system == LOINC)
        if found is not None:
            analyte, loinc = found, coding.code if coding.system == LOINC else None
            break
        ignored = ignored or mapping.ignores(coding.code)
    if analyte is None:
        if ignored:
            return None
        codes = ", ".join(f"{c.system or '(no system)'}|{c.code}" for c in obs.code.coding or []) or "none"
        raise _Refused(
            f"unknown observation code ({codes}); expected a LOINC code of a monitored analyte, "
            "or a code in the mapping file's local_codes or ignore_codes"
        )

    status = STATUS_BY_OBSERVATION.get(obs.status or "")
    if status is None:
        raise _Refused(f"Observation.status {obs.status!r} carries no result (expected final, preliminary, ...)")
    quantity = obs.valueQuantity
    if quantity is None or quantity.value is None:
        extra = "; a cancelled result must repeat its value (contract v1 requires one)" if status == "cancelled" else ""
        raise _Refused(f"Observation.valueQuantity.value is missing{extra}")
    if quantity.comparator:
        raise _Refused(f"valueQuantity has comparator {quantity.comparator!r}; only an exact value can be graded")
    unit = _unit(quantity.code, quantity.system, quantity.unit, "valueQuantity")

    value: dict[str, Any] = {
        "subject_id": _subject(obs.subject, mapping, patients, "Observation"),
        "site_id": mapping.site_id,
        "occurred_at": _time(_effective(obs), "Observation.effectiveDateTime"),
        "source": mapping.source or "fhir",
        "analyte": analyte,
        "value": float(quantity.value),
        "unit": unit,
        "status": status,
    }
    if isinstance(obs.issued, datetime):
        value["recorded_at"] = obs.issued.isoformat()
    if loinc:
        value["loinc"] = loinc
    for bound in ("low", "high"):
        limit = getattr(obs.referenceRange[0], bound) if obs.referenceRange else None
        if limit is None or limit.value is None:
            continue
        if (limit.code or limit.unit) and _unit(limit.code, limit.system, limit.unit, "referenceRange") != unit:
            raise _Refused(f"referenceRange.{bound} is in another unit than the value")
        value[f"ref_{bound}"] = float(limit.value)
    stable, event_id = _identity(raw, "Observation", full_url)
    value["event_id"] = event_id
    if stable:
        value["result_id"] = stable
    event = _validate_event(LABS, value)
    assert isinstance(event, Lab)
    return event


def _effective(obs: Observation) -> datetime | date | str | None:
    if obs.effectiveDateTime is not None:
        return obs.effectiveDateTime
    if obs.effectiveInstant is not None:
        return obs.effectiveInstant
    return obs.effectivePeriod.start if obs.effectivePeriod is not None else None


def _unit(code: str | None, system: str | None, text: str | None, where: str) -> str:
    unit = code if code and (system in (None, UCUM)) else text
    if not unit:
        raise _Refused(f"{where} has no unit (a UCUM code, or unit)")
    return ucum(unit)


def _codes(concept: CodeableConcept | None) -> list[str]:
    if concept is None:
        return []
    codes = [c.code.strip().lower() for c in concept.coding or [] if c.code]
    if concept.text:
        codes.append(concept.text.strip().lower())
    return codes


def _grade(ae: FhirAdverseEvent) -> int:
    for extension in [*(ae.extension or []), *((ae.severity.extension or []) if ae.severity else [])]:
        if extension.url == CTCAE_GRADE_EXTENSION:
            if not isinstance(extension.valueInteger, int) or not 1 <= extension.valueInteger <= 5:
                raise _Refused("the ctcae-grade extension needs valueInteger 1 to 5")
            return extension.valueInteger
    for code in _codes(ae.severity):
        if code in GRADE_BY_SEVERITY:
            return GRADE_BY_SEVERITY[code]
    raise _Refused(
        f"no CTCAE grade: send the extension {CTCAE_GRADE_EXTENSION} (valueInteger 1-5) "
        "or severity mild | moderate | severe"
    )


def _serious(ae: FhirAdverseEvent) -> bool:
    codes = _codes(ae.seriousness)
    if not codes:
        raise _Refused("AdverseEvent.seriousness is missing (serious or non-serious)")
    if any(c in ("non-serious", "nonserious") for c in codes):
        return False
    if any(c.startswith("serious") for c in codes):
        return True
    raise _Refused(f"AdverseEvent.seriousness {codes[0]!r} is neither serious nor non-serious")


def _attribution(ae: FhirAdverseEvent) -> str:
    found: set[str] = set()
    unknown: list[str] = []
    for suspect in ae.suspectEntity or []:
        for causality in suspect.causality or []:
            for code in _codes(causality.assessment):
                if code in ATTRIBUTION_BY_CAUSALITY:
                    found.add(ATTRIBUTION_BY_CAUSALITY[code])
                else:
                    unknown.append(code)
    for attribution in ATTRIBUTION_ORDER:
        if attribution in found:
            return attribution
    if unknown:
        raise _Refused(f"causality assessment {unknown[0]!r} cannot be mapped to an attribution")
    raise _Refused("no suspectEntity.causality.assessment: the attribution is required")


def _term(ae: FhirAdverseEvent) -> str:
    concept = ae.event
    if concept is not None:
        for coding in concept.coding or []:
            if coding.display:
                return str(coding.display)
        if concept.text:
            return str(concept.text)
    raise _Refused("AdverseEvent.event has no CTCAE term (coding.display or text)")


def _adverse_event(
    raw: dict[str, Any], mapping: AdapterMapping, patients: dict[str, list[str]], full_url: str | None
) -> AdverseEvent:
    ae: FhirAdverseEvent = _validated(FhirAdverseEvent, raw)
    if ae.actuality != "actual":
        raise _Refused(f"AdverseEvent.actuality is {ae.actuality!r}: only actual adverse events are reported")
    stable, event_id = _identity(raw, "AdverseEvent", full_url)
    value: dict[str, Any] = {
        "event_id": event_id,
        "subject_id": _subject(ae.subject, mapping, patients, "AdverseEvent"),
        "site_id": mapping.site_id,
        "occurred_at": _time(ae.date or ae.detected, "AdverseEvent.date"),
        "source": mapping.source or "fhir",
        "term": _term(ae),
        "grade": _grade(ae),
        "serious": _serious(ae),
        "attribution": _attribution(ae),
    }
    if ae.recordedDate is not None:
        value["recorded_at"] = _time(ae.recordedDate, "AdverseEvent.recordedDate")
    if stable:
        value["ae_id"] = stable
    event = _validate_event(ADVERSE_EVENTS, value)
    assert isinstance(event, AdverseEvent)
    return event
