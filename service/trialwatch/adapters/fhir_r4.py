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
import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
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

# Bounds on what is read at all (issue 10). A document is a whole file or one
# NDJSON line; past these it is refused unread, with the bound as the reason.
MAX_DOCUMENT_CHARS = 16 * 1024 * 1024
# JSON nesting: a Bundle entry's Observation is about 10 deep; this leaves room
# for contained resources and extensions while keeping every later step (the
# JSON encoder, pydantic, fhir.resources) far from Python's recursion limit.
MAX_DEPTH = 64
# Characters of one JSON number: FHIR decimals carry at most 18 digits, and
# Python refuses to read integers of more than 4,300.
MAX_NUMBER_CHARS = 40
# Bounds on what is published: an event field longer than the contract accepts
# is refused here with a reason rather than sent to be dead-lettered.
MAX_TERM_CHARS = 200
# What a refusal quotes of the input (a code, a status), and a refusal's length.
MAX_QUOTED_CHARS = 60
MAX_REASON_CHARS = 600
MAX_PROBLEMS_SHOWN = 3
# A FHIR id (R4 `id` datatype); anything else is not shown in a location.
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")


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


class _Unreadable(Exception):
    """A document that is not read: not JSON, or past one of the bounds above."""


def map_fhir(data: str | bytes, mapping: AdapterMapping) -> list[FhirOutcome]:
    """Map a single resource, a Bundle, or NDJSON (one resource a line) to events, one outcome per resource.

    Total: whatever `data` holds, every resource in it is mapped or refused
    with a reason, and a bad NDJSON line is refused on its own.
    """
    outcomes: list[FhirOutcome] = []
    for where, item in _documents(data):
        if isinstance(item, str):
            outcomes.append(FhirOutcome(where, reason=item))
        elif item.get("resourceType") == "Bundle":
            outcomes.extend(_bundle(item, mapping, where))
        else:
            outcomes.append(_resource(item, mapping, where, {}, None, in_bundle=False))
    return outcomes


def _documents(data: str | bytes) -> list[tuple[str, dict[str, Any] | str]]:
    """The document, or failing that each NDJSON line: a JSON object, or why it cannot be read."""
    try:
        return [("resource", _object(_parse(_decoded(data))))]
    except _Unreadable as exc:
        whole = str(exc)
    lines: list[tuple[str, dict[str, Any] | str]] = []
    any_read = False
    for number, line in enumerate(_lines(data), start=1):
        if not line.strip():
            continue
        try:
            lines.append((f"line {number}", _object(_parse(_decoded(line)))))
            any_read = True
        except _Unreadable as exc:
            lines.append((f"line {number}", str(exc)))
    # Not NDJSON either (say a pretty-printed Bundle): one reason, not one a line.
    return lines if any_read else [("resource", whole)] if lines else []


def _lines(data: str | bytes) -> list[str | bytes]:
    # NDJSON lines end at \n alone: U+2028 and the like may sit inside a JSON string.
    return [*data.split(b"\n")] if isinstance(data, bytes) else [*data.split("\n")]


def _object(value: Any) -> dict[str, Any] | str:
    return value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not a resource"


def _decoded(data: str | bytes) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"not UTF-8 (byte {exc.start + 1})") from None


def _parse(text: str) -> Any:
    """The one JSON parse: bounded in size, depth and numbers; raises only `_Unreadable`."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise _Unreadable(f"larger than {MAX_DOCUMENT_CHARS:,} characters")
    try:
        value = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_unique_keys
        )
    except json.JSONDecodeError as exc:
        raise _Unreadable(f"not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise _Unreadable(f"nested deeper than {MAX_DEPTH} levels") from None
    if _deeper_than(value, MAX_DEPTH):
        raise _Unreadable(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Unreadable(f"a number of more than {MAX_NUMBER_CHARS} characters")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Unreadable(f"a number of more than {MAX_NUMBER_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise _Unreadable("a number out of range (beyond ±1.8e308)")
    return value


def _constant(name: str) -> Any:
    raise _Unreadable(f"not JSON: {name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        # The key is not named: it is the input's, and could be anything.
        raise _Unreadable("an object has the same key twice (which one counts is ambiguous)")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests deeper than `limit`, without recursing."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _quoted(value: object) -> str:
    """A value of the input as a refusal quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[:MAX_QUOTED_CHARS]}…"


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
            values = _patient_identifiers(resource)
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


def _patient_identifiers(patient: dict[str, Any]) -> list[str]:
    """Patient.identifier[].value, of whatever shape the entry has: the well-formed ones only."""
    identifiers = patient.get("identifier")
    if not isinstance(identifiers, list):
        return []
    return [i["value"] for i in identifiers if isinstance(i, dict) and isinstance(i.get("value"), str)]


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
        named = isinstance(kind, str) and RESOURCE_TYPE.fullmatch(kind) is not None
        label = f"{where} ({kind})" if named else where
        if named and in_bundle:
            # A Bundle carries Patients, Encounters, ... alongside what we map.
            return FhirOutcome(label, skipped=True, reason=f"{kind} is not mapped (only Observation, AdverseEvent)")
        return FhirOutcome(label, reason=f"not an Observation or AdverseEvent (resourceType {_quoted(kind)})")
    rid = raw.get("id")
    label = f"{where} {kind}/{rid}" if isinstance(rid, str) and FHIR_ID.fullmatch(rid) else f"{where} {kind}"
    try:
        if kind == "Observation":
            event: InputEvent | None = _observation(raw, mapping, patients, full_url)
        else:
            event = _adverse_event(raw, mapping, patients, full_url)
    except _Refused as refused:
        reason = str(refused)
        if len(reason) > MAX_REASON_CHARS:
            reason = f"{reason[:MAX_REASON_CHARS]}…"
        return FhirOutcome(label, reason=reason)
    if event is None:
        return FhirOutcome(label, skipped=True, reason="observation code is in ignore_codes")
    return FhirOutcome(label, event)


def _validated(model: type[Observation] | type[FhirAdverseEvent], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # No input values: a subject reference or identifier may be in them.
        errors = exc.errors(include_url=False, include_input=False)
        problems = "; ".join(
            f"{'.'.join(str(p)[:MAX_QUOTED_CHARS] for p in e['loc']) or '(resource)'}: {e['msg'][:200]}"
            for e in errors[:MAX_PROBLEMS_SHOWN]
        )
        more = f" (and {len(errors) - MAX_PROBLEMS_SHOWN} more)" if len(errors) > MAX_PROBLEMS_SHOWN else ""
        raise _Refused(f"not a valid FHIR R4 {model.__name__}: {problems}{more}") from None


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
    raise _Refused(f"{name} {_quoted(str(value))} is a date without a time; contract v1 needs a date-time with offset")


def _validate_event(topic: str, value: dict[str, Any]) -> InputEvent:
    event = decode(topic, json.dumps(value).encode())
    if isinstance(event, Rejection):
        raise _Refused(f"{event.reason}: {event.detail}")
    return event


def _observation(
    raw: dict[str, Any], mapping: AdapterMapping, patients: dict[str, list[str]], full_url: str | None
) -> Lab | None:
    obs: Observation = _validated(Observation, raw)
    coded = _analyte(obs, mapping)
    if coded is None:
        return None
    analyte, loinc = coded
    status = STATUS_BY_OBSERVATION.get(obs.status or "")
    if status is None:
        raise _Refused(f"Observation.status {_quoted(obs.status)} carries no result (expected final, preliminary, ...)")
    quantity = obs.valueQuantity
    if quantity is None or quantity.value is None:
        extra = "; a cancelled result must repeat its value (contract v1 requires one)" if status == "cancelled" else ""
        raise _Refused(f"Observation.valueQuantity.value is missing{extra}")
    if quantity.comparator:
        raise _Refused(f"valueQuantity has comparator {_quoted(quantity.comparator)}; only an exact value is graded")
    unit = _unit(quantity.code, quantity.system, quantity.unit, "valueQuantity")

    value: dict[str, Any] = {
        "subject_id": _subject(obs.subject, mapping, patients, "Observation"),
        "site_id": mapping.site_id,
        "occurred_at": _time(_effective(obs), "Observation.effectiveDateTime"),
        "source": mapping.source or "fhir",
        "analyte": analyte,
        "value": _finite(quantity.value, "Observation.valueQuantity.value"),
        "unit": unit,
        "status": status,
    }
    if isinstance(obs.issued, datetime):
        value["recorded_at"] = obs.issued.isoformat()
    if loinc:
        value["loinc"] = loinc
    value.update(_reference_range(obs, unit))
    stable, event_id = _identity(raw, "Observation", full_url)
    value["event_id"] = event_id
    if stable:
        value["result_id"] = stable
    event = _validate_event(LABS, value)
    assert isinstance(event, Lab)
    return event


def _analyte(obs: Observation, mapping: AdapterMapping) -> tuple[str, str | None] | None:
    """The analyte and LOINC code of the Observation's first mapped code; None when its codes are ignored."""
    if obs.code is None:
        # Required in FHIR, but fhir.resources leaves required elements unchecked.
        raise _Refused("Observation.code is missing")
    ignored = False
    for coding in obs.code.coding or []:
        if not coding.code:
            continue
        found = mapping.analyte_for(coding.code, coding.system == LOINC)
        if found is not None:
            return found, coding.code if coding.system == LOINC else None
        ignored = ignored or mapping.ignores(coding.code)
    if ignored:
        return None
    codes = ", ".join(_quoted(f"{c.system or '(no system)'}|{c.code}") for c in obs.code.coding or []) or "none"
    raise _Refused(
        f"unknown observation code ({codes}); expected a LOINC code of a monitored analyte, "
        "or a code in the mapping file's local_codes or ignore_codes"
    )


def _reference_range(obs: Observation, unit: str) -> dict[str, float]:
    """ref_low and ref_high from the first referenceRange, in the value's unit."""
    out: dict[str, float] = {}
    for bound in ("low", "high"):
        limit = getattr(obs.referenceRange[0], bound) if obs.referenceRange else None
        if limit is None or limit.value is None:
            continue
        if (limit.code or limit.unit) and _unit(limit.code, limit.system, limit.unit, "referenceRange") != unit:
            raise _Refused(f"referenceRange.{bound} is in another unit than the value")
        out[f"ref_{bound}"] = _finite(limit.value, f"referenceRange.{bound}.value")
    return out


def _finite(value: Decimal, where: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise _Refused(f"{where} is out of range (beyond ±1.8e308)")
    return number


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
    raise _Refused(f"AdverseEvent.seriousness {_quoted(codes[0])} is neither serious nor non-serious")


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
        raise _Refused(f"causality assessment {_quoted(unknown[0])} cannot be mapped to an attribution")
    raise _Refused("no suspectEntity.causality.assessment: the attribution is required")


def _term(ae: FhirAdverseEvent) -> str:
    concept = ae.event
    terms = [str(c.display) for c in (concept.coding or []) if c.display] if concept is not None else []
    if concept is not None and concept.text:
        terms.append(str(concept.text))
    # Free text from a hospital system: white space around it is no part of the term.
    terms = [term.strip() for term in terms if term.strip()]
    if not terms:
        raise _Refused("AdverseEvent.event has no CTCAE term (coding.display or text)")
    if len(terms[0]) > MAX_TERM_CHARS:
        raise _Refused(f"AdverseEvent.event term is {len(terms[0]):,} characters, more than {MAX_TERM_CHARS}")
    return terms[0]


def _adverse_event(
    raw: dict[str, Any], mapping: AdapterMapping, patients: dict[str, list[str]], full_url: str | None
) -> AdverseEvent:
    ae: FhirAdverseEvent = _validated(FhirAdverseEvent, raw)
    if ae.actuality != "actual":
        raise _Refused(f"AdverseEvent.actuality is {_quoted(ae.actuality)}: only actual adverse events are reported")
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
