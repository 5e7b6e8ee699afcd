"""The v1 event contract as pydantic models: what hospitals publish, what the DSMB receives."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trialwatch.units import (
    ANALYTE_LOINC,
    ANALYTE_NAMES,
    CANONICAL_UNIT,
    DISPLAY_UNIT,
    PLAUSIBLE,
    Analyte,
    to_canonical,
    unit_fits,
)

# Topic names are fixed by the v1 contract.
ENROLLMENT = "trial.enrollment.v1"
TREATMENT = "trial.treatment.v1"
LABS = "trial.labs.v1"
SCANS = "trial.scans.v1"
ADVERSE_EVENTS = "trial.adverse-events.v1"
ALERTS = "trial.alerts.v1"
ALERTS_MASKED = "trial.alerts.masked.v1"
DEADLETTER = "trial.deadletter.v1"
# Not in the v1 event contract (which covers hospital input and the alert
# streams); added by the DSMB delivery work: the audit trail of acknowledgements.
ALERT_ACKS = "trial.alert-acks.v1"

INPUT_TOPICS: tuple[str, ...] = (ENROLLMENT, TREATMENT, LABS, SCANS, ADVERSE_EVENTS)
OUTPUT_TOPICS: tuple[str, ...] = (ALERTS, ALERTS_MASKED, DEADLETTER)


def missing_field(message: str) -> PydanticCustomError:
    """A field the contract requires in this context is absent (dead-letter reason `missing_field`)."""
    return PydanticCustomError("missing_field", message)


def implausible(message: str) -> PydanticCustomError:
    """A well-formed value no real record can have (dead-letter reason `implausible_value`)."""
    return PydanticCustomError("implausible_value", message)


# Bounds on what a hospital can send. Each one keeps the engine's arithmetic
# total (no overflow, no Decimal precision trap, no date out of range) and
# every record derived from an input far below Kafka's 1 MB record limit.

# An input record larger than this is refused before it is parsed: the largest
# real message, a scan with 100 lesions, is about 20 kB.
MAX_INPUT_BYTES = 64 * 1024

# Identifiers: printable (no control, format or private-use characters), not
# blank, no leading or trailing white space ("TW-001 " would be a second
# subject). ECMA-262 and the Rust regex engine read \p{C} the same way.
IDENTIFIER_PATTERN = r"^[^\p{C}\s](?:[^\p{C}]*[^\p{C}\s])?$"
# Labels a site writes (an AE term, an organ): surrounding white space is
# stripped (padded columns), format characters such as a soft hyphen pasted
# from a word processor are allowed; control characters and blanks are not.
# A label never identifies anything, so lenience costs nothing and refusing
# would drop the record (a serious adverse event).
LABEL_PATTERN = r"^[^\p{Cc}]+$"

EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
SubjectId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
SiteId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=IDENTIFIER_PATTERN)]
# Other identifiers a publisher makes up: results, scans, lesions, adverse events, sources.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=LABEL_PATTERN)]


def _empty_is_absent(value: Any) -> Any:
    return None if value == "" else value


# Optional text no rule reads (`note`, `source`): an empty string means absent,
# and any text up to its length is accepted, so a stray character never
# drops an SBRT fraction or a serious adverse event.
Note = Annotated[Annotated[str, Field(max_length=2000)] | None, BeforeValidator(_empty_is_absent)]
Source = Annotated[Annotated[str, Field(max_length=128)] | None, BeforeValidator(_empty_is_absent)]

# Systems stamp `recorded_at` and `occurred_at` from different clocks: a
# record may seem to precede its event by this much before it is implausible.
RECORDED_BEFORE_OCCURRED_TOLERANCE = timedelta(hours=24)

# Clinical times a record of this trial can carry: anything outside is a
# typo or a placeholder (0001-01-01, 9999-12-31), and would overflow the
# date arithmetic of the rules (a deadline 14 days after 9999-12-31).
EARLIEST_CLINICAL_TIME = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_CLINICAL_TIME = datetime(2100, 1, 1, tzinfo=UTC)
# Fields whose upper bound is a plausibility bound (a dose over 60 Gy, a
# lesion over 50 cm): past it the reason is `implausible_value`.
PLAUSIBILITY_BOUNDED = frozenset({"fraction", "dose_gy", "diameter_mm"})

# UTC offsets in use on Earth run from -12:00 to +14:00.
MIN_UTC_OFFSET = timedelta(hours=-12)
MAX_UTC_OFFSET = timedelta(hours=14)


def check_clinical_time(value: datetime, name: str) -> datetime:
    offset = value.utcoffset()
    if offset is not None and not MIN_UTC_OFFSET <= offset <= MAX_UTC_OFFSET:
        raise implausible(f"{name} has UTC offset {value.strftime('%z')}: offsets run from -12:00 to +14:00")
    if not EARLIEST_CLINICAL_TIME <= value < LATEST_CLINICAL_TIME:
        raise implausible(f"{name} is outside 2000-01-01 .. 2099-12-31")
    return value


class _Input(BaseModel):
    """Fields every input message carries.

    Strict mode: a number sent as a string, a bool sent as 0/1 or a naive
    date-time is a publisher bug the integrator must hear about, not something
    to coerce silently. Unknown fields are ignored so that additive v1 fields
    from newer publishers do not bounce.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", allow_inf_nan=False)

    event_id: EventId
    subject_id: SubjectId
    site_id: SiteId
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime | None = None
    source: Source = None

    @field_validator("occurred_at", "recorded_at")
    @classmethod
    def _plausible_time(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        return None if value is None else check_clinical_time(value, str(info.field_name))

    @model_validator(mode="after")
    def _recorded_after_it_happened(self) -> _Input:
        if self.recorded_at is not None and self.recorded_at < self.occurred_at - RECORDED_BEFORE_OCCURRED_TOLERANCE:
            raise implausible("recorded_at is more than 24 h before occurred_at: a record cannot precede its event")
        return self

    @property
    def recorded_or_occurred_at(self) -> datetime:
        """The reporting clock of an SAE starts at `recorded_at`, defaulting to `occurred_at`."""
        return self.recorded_at or self.occurred_at


class Arm(StrEnum):
    SBRT = "sbrt"
    CONTROL = "control"


FirstLineRegimen = Literal["atezolizumab+bevacizumab", "sintilimab+bevacizumab", "lenvatinib", "lenvatinib+pd1"]
SecondLineRegimen = Literal["lenvatinib", "regorafenib", "regorafenib+pd1"]


class Enrollment(_Input):
    """`trial.enrollment.v1`: a subject is enrolled and randomised."""

    arm: Arm
    first_line_regimen: FirstLineRegimen
    age_years: Annotated[int, Field(ge=0, le=130)]
    kps: Annotated[int, Field(ge=0, le=100)]
    child_pugh_score: Annotated[int, Field(ge=5, le=15)]


TreatmentKind = Literal[
    "second_line_start",
    "sbrt_fraction",
    "sbrt_completed",
    "systemic_held",
    "systemic_resumed",
    "withdrawal",
]
WithdrawalReason = Literal["progression", "toxicity", "consent_withdrawn", "other"]


class Treatment(_Input):
    """`trial.treatment.v1`: second-line start, SBRT fractions, systemic holds, withdrawal."""

    kind: TreatmentKind
    regimen: SecondLineRegimen | None = None
    # SBRT for HCC is given in 1 to 15 fractions; conventional courses stay under 40.
    fraction: Annotated[int, Field(ge=1, le=50)] | None = None
    # The dose of this fraction. The largest single fractions in use are 34 Gy
    # (lung, RTOG 0915); 60 still admits them and catches doses sent in cGy.
    dose_gy: Annotated[float, Field(gt=0, le=60)] | None = None
    reason: WithdrawalReason | None = None
    note: Note = None

    @model_validator(mode="after")
    def _kind_fields(self) -> Treatment:
        # The contract ties these fields to their kind; without them the
        # window and deviation rules would have nothing to check.
        required = {
            "second_line_start": ("regimen",),
            "sbrt_fraction": ("fraction", "dose_gy"),
            "withdrawal": ("reason",),
        }.get(self.kind, ())
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise missing_field(f"{self.kind} requires {', '.join(repr(m) for m in missing)}")
        return self


LabStatus = Literal["preliminary", "final", "corrected", "cancelled"]


class Lab(_Input):
    """`trial.labs.v1`: one lab result; `value`, `ref_low`, `ref_high` share `unit`."""

    analyte: Analyte
    loinc: Annotated[str, Field(min_length=1, max_length=16)] | None = None
    value: Annotated[float, Field(ge=0, description="Plausible range per analyte: schemas/units.json")]
    unit: Annotated[str, Field(min_length=1, max_length=32)]
    # An implausible or inconsistent range is set aside (the engine grades on
    # the protocol's default range and says so), never a reason to drop a result.
    ref_low: Annotated[float, Field(ge=0)] | None = None
    ref_high: (
        Annotated[float, Field(ge=0, description="The ULN; plausible range per analyte: schemas/units.json")] | None
    ) = None
    status: LabStatus = "final"
    result_id: Identifier | None = None

    @field_validator("unit")
    @classmethod
    def _unit_fits_analyte(cls, unit: str, info: ValidationInfo) -> str:
        analyte = info.data.get("analyte")
        if analyte is not None and not unit_fits(analyte, unit):
            raise ValueError(
                f"unit {unit!r} does not fit analyte {analyte!r}; the accepted units are listed in schemas/units.json"
            )
        return unit

    @field_validator("loinc")
    @classmethod
    def _loinc_is_a_code_of_analyte(cls, loinc: str | None, info: ValidationInfo) -> str | None:
        analyte = info.data.get("analyte")
        if loinc is not None and analyte is not None and loinc not in ANALYTE_LOINC[analyte]:
            raise ValueError(f"LOINC {loinc!r} is not a code of analyte {analyte!r}")
        return loinc

    @model_validator(mode="after")
    def _plausible(self) -> Lab:
        # In the analyte's canonical unit, so one table serves every unit. An
        # implausible reference range is not refused: the value can still be
        # graded, on the protocol's default range (the engine does, and says so).
        value_max = PLAUSIBLE[self.analyte].value_max
        if to_canonical(self.analyte, self.value, self.unit) > value_max:
            raise implausible(
                f"value is above the plausible maximum for {self.analyte} ({value_max} {CANONICAL_UNIT[self.analyte]})"
            )
        return self

    @property
    def result_key(self) -> str:
        """The same result across preliminary, final, corrected and cancelled versions."""
        return self.result_id or self.event_id


class Lesion(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", allow_inf_nan=False)

    lesion_id: Identifier
    organ: Label
    role: Literal["target", "non_target", "new"]
    # The largest liver tumours measure about 30 cm.
    diameter_mm: Annotated[float, Field(ge=0, le=500)] | None = None
    lymph_node: bool = False
    unequivocal_progression: bool = False

    @model_validator(mode="after")
    def _target_has_diameter(self) -> Lesion:
        if self.role == "target" and self.diameter_mm is None:
            raise missing_field(f"target lesion {self.lesion_id!r} requires 'diameter_mm'")
        return self


class Scan(_Input):
    """`trial.scans.v1`: one imaging assessment with its lesion measurements."""

    scan_id: Identifier
    timepoint: Literal["baseline", "follow_up"]
    modality: Literal["CT", "MRI", "PET-CT"]
    lesions: Annotated[list[Lesion], Field(max_length=100)]

    @field_validator("lesions")
    @classmethod
    def _unique_lesions(cls, lesions: list[Lesion]) -> list[Lesion]:
        ids = [lesion.lesion_id for lesion in lesions]
        if len(ids) != len(set(ids)):
            raise ValueError("lesion_id values must be unique within a scan")
        return lesions


Attribution = Literal["unrelated", "unlikely", "possible", "probable", "definite"]


class AdverseEvent(_Input):
    """`trial.adverse-events.v1`: one adverse event report, or an update of one (same `ae_id`)."""

    ae_id: Identifier | None = None
    term: Label
    grade: Annotated[int, Field(ge=1, le=5)]
    serious: bool
    attribution: Attribution
    attributed_to: Annotated[list[Literal["sbrt", "systemic"]], Field(max_length=2)] | None = None

    @model_validator(mode="after")
    def _death_is_serious(self) -> AdverseEvent:
        # ICH E2A: an adverse event that results in death is serious by definition.
        if self.grade == 5 and not self.serious:
            raise implausible("grade 5 (death) with serious false: an adverse event resulting in death is serious")
        return self

    @property
    def ae_key(self) -> str:
        return self.ae_id or self.event_id


InputEvent = Enrollment | Treatment | Lab | Scan | AdverseEvent

MODEL_BY_TOPIC: dict[str, type[_Input]] = {
    ENROLLMENT: Enrollment,
    TREATMENT: Treatment,
    LABS: Lab,
    SCANS: Scan,
    ADVERSE_EVENTS: AdverseEvent,
}
TOPIC_BY_MODEL: dict[type[_Input], str] = {model: topic for topic, model in MODEL_BY_TOPIC.items()}

Severity = Literal["info", "warning", "high", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "high": 2, "critical": 3}


class AlertMessage(BaseModel):
    """One state of an alert on `trial.alerts.v1` (keyed by `alert_id`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alert_id: str
    revision: Annotated[int, Field(ge=1)]
    status: Literal["firing", "resolved"]
    rule: str
    severity: Severity
    subject_id: str
    site_id: str
    arm: Arm | None = None
    occurred_at: AwareDatetime
    raised_at: AwareDatetime
    ctcae_grade: int | None = None
    report_due_at: AwareDatetime | None = None
    evidence: dict[str, Any]
    summary: str


class MaskedAlertMessage(BaseModel):
    """One state of an alert on `trial.alerts.masked.v1`: no `arm`, no arm-revealing rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alert_id: str
    revision: Annotated[int, Field(ge=1)]
    status: Literal["firing", "resolved"]
    rule: str
    severity: Severity
    subject_id: str
    site_id: str
    occurred_at: AwareDatetime
    raised_at: AwareDatetime
    ctcae_grade: int | None = None
    report_due_at: AwareDatetime | None = None
    evidence: dict[str, Any]
    summary: str


class AlertAck(BaseModel):
    """A DSMB member acknowledged one state (revision) of an alert; on `trial.alert-acks.v1`, keyed by `alert_id`.

    `ack_id` is derived from (`alert_id`, `revision`): acknowledging the same
    state twice yields the same id, so readers keep the first and the record
    is harmless when repeated. A later revision (the severity rose) needs an
    acknowledgement of its own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ack_id: str
    alert_id: str
    revision: Annotated[int, Field(ge=1, description="The alert state that was acknowledged")]
    acknowledged_by: Annotated[str, Field(min_length=1, max_length=128, description="DSMB member, as they sign")]
    comment: Annotated[str, Field(max_length=2000)] | None = None
    acknowledged_at: AwareDatetime


# The blinded stream is an allow-list, never a deny-list: a rule reaches it
# only when listed here, and of its alert only the fields listed, down to each
# key of the evidence. Each listed value is either computed by the service
# from arm-free inputs or a closed vocabulary. Not listed: anything about SBRT
# (attributed_to, fractions, doses), free text a site wrote (an adverse
# event's term), and identifiers a site made up (event, result, AE, scan and
# lesion ids: "CT-3m-post-SBRT" is a scan id a site could send); blinded
# readers identify an alert by its alert_id. A new evidence field or a new
# rule stays off the masked stream until someone decides it is arm-free.
# `True` keeps a value whole (for `parameters`: the protocol's own constants);
# `COUNT` keeps only the length of a list; a nested allow-list keeps those
# keys of an object, or of every object of a list.
COUNT = "count"
MaskedFields = Mapping[str, "bool | str | MaskedFields"]

_LAB_EVIDENCE: MaskedFields = dict.fromkeys(
    (
        "analyte", "result_status", "value", "unit", "value_as_sent", "unit_as_sent",
        "uln", "uln_origin", "uln_note", "times_uln", "threshold", "threshold_value", "late_result",
        "resolved_because", "parameters", "protocol_version", "ctcae_version",
    ),
    True,
) | {"baseline": dict.fromkeys(("value", "at", "abnormal"), True)}  # fmt: skip
_AE_EVIDENCE: MaskedFields = dict.fromkeys(
    (
        "grade", "serious", "attribution", "reporting_clock_starts_at", "resolved_because",
        "parameters", "protocol_version", "ctcae_version",
    ),
    True,
)  # fmt: skip
MASKED_EVIDENCE: dict[str, MaskedFields] = {
    "lab.platelets.low": _LAB_EVIDENCE,
    "lab.bilirubin.high": _LAB_EVIDENCE,
    "lab.ctcae.grade3plus": _LAB_EVIDENCE,
    "ae.grade3plus": _AE_EVIDENCE,
    "ae.serious": _AE_EVIDENCE,
    "eligibility.violation": dict.fromkeys(
        ("screening_window_days", "resolved_because", "protocol_version"), True
    )
    | {"failures": dict.fromkeys(("criterion", "value", "allowed", "unit"), True)},
    "protocol.regimen_mismatch": dict.fromkeys(
        ("first_line_regimen", "second_line_regimen", "allowed_second_line", "protocol_version"), True
    ),
    "recist.progression": dict.fromkeys(
        (
            "sum_mm", "baseline_sum_mm", "target_response", "non_target_response", "time_point_response",
            "best_overall_response", "first_progression_at", "protocol_version",
        ),
        True,
    )
    | {"new_lesions": COUNT},
}  # fmt: skip


def reveals_arm(rule: str) -> bool:
    """Whether a rule stays off the blinded stream: every rule not allow-listed for it."""
    return rule not in MASKED_EVIDENCE


def masked_evidence(value: Any, allowed: MaskedFields) -> Any:
    """The allow-listed part of an evidence object (recursively); anything unlisted is dropped."""
    if isinstance(value, list):
        return [masked_evidence(v, allowed) for v in value if isinstance(v, dict)]
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}
    for key, rule in allowed.items():
        if key not in value:
            continue
        item = value[key]
        if rule is True:
            out[key] = item
        elif rule == COUNT:
            out[key] = len(item) if isinstance(item, list) else None
        elif isinstance(rule, Mapping):
            out[key] = masked_evidence(item, rule)
    return out


def masked_summary(alert: AlertMessage, evidence: dict[str, Any]) -> str:
    """The blinded stream's one line, written from the masked fields only (never the DSMB summary)."""
    rule, grade = alert.rule, alert.ctcae_grade
    graded = f" (CTCAE grade {grade})" if grade is not None else ""
    if alert.status == "resolved":
        because = evidence.get("resolved_because")
        return f"Resolved: {rule}" + (f", {because}" if isinstance(because, str) else "")
    if rule.startswith("lab."):
        analyte = str(evidence.get("analyte", ""))
        unit = str(evidence.get("unit", ""))
        return (
            f"{ANALYTE_NAMES.get(analyte, analyte)} {evidence.get('value')} {DISPLAY_UNIT.get(unit, unit)} "
            f"{evidence.get('threshold', '')}{graded}"
        )
    if rule == "ae.serious":
        due = f"; expedited report due by {alert.report_due_at.isoformat()}" if alert.report_due_at else ""
        return f"Serious adverse event{graded}{due}"
    if rule == "ae.grade3plus":
        return f"Adverse event{graded}, attribution {evidence.get('attribution')}"
    if rule == "eligibility.violation":
        failures = evidence.get("failures") or []
        names = ", ".join(str(f.get("criterion")) for f in failures if isinstance(f, dict))
        return f"Enrolled outside the eligibility criteria: {names}"
    if rule == "protocol.regimen_mismatch":
        return (
            f"Second-line {evidence.get('second_line_regimen')} after first-line "
            f"{evidence.get('first_line_regimen')}: not what the protocol allows"
        )
    if rule == "recist.progression":
        return (
            f"RECIST 1.1 progressive disease: target {evidence.get('target_response')}, "
            f"non-target {evidence.get('non_target_response')}, new lesions {evidence.get('new_lesions')}"
        )
    return f"{rule}: {alert.severity}"


def mask(alert: AlertMessage) -> MaskedAlertMessage | None:
    """Project a DSMB alert onto the blinded stream: allow-listed rules, fields and evidence keys only."""
    allowed = MASKED_EVIDENCE.get(alert.rule)
    if allowed is None:
        return None
    evidence = masked_evidence(alert.evidence, allowed)
    return MaskedAlertMessage(
        alert_id=alert.alert_id,
        revision=alert.revision,
        status=alert.status,
        rule=alert.rule,
        severity=alert.severity,
        subject_id=alert.subject_id,
        site_id=alert.site_id,
        occurred_at=alert.occurred_at,
        raised_at=alert.raised_at,
        ctcae_grade=alert.ctcae_grade,
        report_due_at=alert.report_due_at,
        evidence=evidence,
        summary=masked_summary(alert, evidence),
    )


RejectReason = Literal[
    "not_json",
    "not_an_object",
    "unknown_topic",
    "missing_field",
    "wrong_type",
    "naive_datetime",
    "unknown_enum_value",
    "unit_mismatch",
    "invalid_value",
    "implausible_value",
    "duplicate_key",
    "too_large",
    "key_mismatch",
    "processing_error",
]
"""Why an input was rejected; a small fixed set, so it is also a metric label."""


# A dead letter carries the start of a rejected value, never all of it: the
# value may be as large as the broker accepts, and the dead letter (with its
# JSON escaping and metadata) must still fit.
DEAD_LETTER_EXCERPT_BYTES = 16 * 1024


class DeadLetter(BaseModel):
    """A rejected input message on `trial.deadletter.v1`, with what a publisher needs to fix it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: RejectReason
    detail: str = Field(description="What is wrong, in words a publisher can act on")
    errors: list[dict[str, Any]] = Field(
        default_factory=list, description="Field-level errors: location, message, error type"
    )
    topic: str
    partition: int
    offset: int
    key: str | None = Field(
        description="The record key as UTF-8 text (or base64: when not UTF-8), at most 256 bytes of it"
    )
    payload: str = Field(
        description=(
            "The original value as UTF-8 text (or base64: when not UTF-8); "
            f"only its first {DEAD_LETTER_EXCERPT_BYTES:,} bytes when it is longer (see payload_truncated): "
            "the whole record stays on its topic at topic/partition/offset"
        )
    )
    payload_bytes: int | None = Field(default=None, description="Length of the original value in bytes")
    payload_sha256: str | None = Field(default=None, description="SHA-256 of the original value, hex")
    payload_truncated: bool = Field(default=False, description="payload holds only the start of the value")
    event_id: str | None = None
    rejected_at: AwareDatetime
