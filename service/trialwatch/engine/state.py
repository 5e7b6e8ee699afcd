"""A subject's state between events: what the rules remember, small enough to serialise per event."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict

from trialwatch.contract import Arm, Severity


class _State(BaseModel):
    # Mutable on purpose: the engine owns the state it is handed and updates
    # it in place, which keeps the per-event cost to one decode and one encode.
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class LabResult(_State):
    """The current version of one lab result (`result_id`), in the analyte's canonical unit."""

    analyte: str
    value: Decimal
    unit: str
    value_as_sent: float
    unit_as_sent: str
    uln: Decimal
    # "protocol_default_implausible_site_range": the result came with a range
    # no real laboratory reports (a ULN of 1e-30): graded on the default instead.
    uln_origin: Literal["site", "protocol_default", "protocol_default_implausible_site_range"]
    lln: Decimal = Decimal(0)
    at: datetime
    seq: int
    status: str
    event_id: str


class AdverseEventReport(_State):
    """The current version of one adverse event (`ae_id`): the update recorded last."""

    term: str
    grade: int
    serious: bool
    attribution: str
    attributed_to: list[str] | None
    at: datetime
    seq: int
    event_id: str


class TreatmentEvent(_State):
    """A treatment event the protocol rules need: when it happened clinically and its details."""

    event_id: str
    at: datetime
    seq: int
    regimen: str | None = None
    reason: str | None = None
    fraction: int | None = None


class ScanRecord(_State):
    """What RECIST needs of one scan: target diameters, non-target status, new lesions."""

    scan_id: str
    event_id: str
    at: datetime
    seq: int
    timepoint: str
    targets: dict[str, Decimal]
    target_nodes: list[str] = []
    non_target_progression: bool = False
    non_targets: list[str] = []
    non_targets_gone: list[str] = []
    new_lesions: list[str] = []


class TimepointResponse(_State):
    scan_id: str
    at: datetime
    sum_mm: Decimal | None
    target: str
    non_target: str
    new_lesions: bool
    overall: str


class Episode(_State):
    """Clinical time span of a closed alert, so a late result inside it does not reopen it."""

    started_at: datetime
    ended_at: datetime


class AlertRecord(_State):
    """The latest state of one alert of a subject, open or resolved."""

    alert_id: str
    rule: str
    key: str
    revision: int
    status: Literal["firing", "resolved"]
    severity: Severity
    ctcae_grade: int | None = None
    report_due_at: datetime | None = None
    support: list[str] = []
    started_at: datetime


class SubjectState(_State):
    subject_id: str
    site_id: str
    arm: Arm | None = None
    enrolled_event_id: str | None = None
    first_line_regimen: str | None = None
    enrolled_at: datetime | None = None
    age_years: int | None = None
    kps: int | None = None
    child_pugh_score: int | None = None
    # Treatment history, each list in arrival order (rules sort by clinical time).
    second_line_starts: list[TreatmentEvent] = []
    sbrt_fractions: list[TreatmentEvent] = []
    sbrt_completions: list[TreatmentEvent] = []
    systemic_holds: list[TreatmentEvent] = []
    systemic_resumptions: list[TreatmentEvent] = []
    withdrawals: list[TreatmentEvent] = []
    seq: int = 0
    seen_event_ids: set[str] = set()
    labs: dict[str, LabResult] = {}
    adverse_events: dict[str, AdverseEventReport] = {}
    # Keyed by "<rule>|<episode key>": the current or last alert of that kind.
    alerts: dict[str, AlertRecord] = {}
    closed_episodes: dict[str, list[Episode]] = {}
    # Earliest pending deadline (SBRT window, ...); None while nothing is due.
    next_deadline_at: datetime | None = None
    scans: dict[str, ScanRecord] = {}
    # RECIST 1.1 outcome, recomputed in clinical-time order after each scan:
    # for progression-free survival and objective response rate.
    responses: list[TimepointResponse] = []
    best_overall_response: str | None = None
    progression_at: datetime | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SubjectState:
        return cls.model_validate_json(data)
