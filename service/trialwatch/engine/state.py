"""A subject's state between events: what the rules remember, bounded whatever the length of the history.

The state keeps what the rules need, not the history: each rule module
declares what it reads (see `retention`), and `retention.compact` forgets the
rest. The structs are msgspec's: one state decodes and encodes in tens of
microseconds, as compact arrays, where the pydantic models it replaced spent
most of a worker's per-event time (see `encode_state`).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

import msgspec

from trialwatch.contract import Arm, Severity
from trialwatch.units import CANONICAL_UNIT


class _State(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Mutable on purpose: the engine owns the state it is handed and updates it in place.

    gc=False: a state is a tree (no reference cycles), and thousands of them
    live in a worker or a replay; the cyclic collector need not walk them.
    """


class LabResult(_State):
    """The current version of one lab result (`result_id`), in the analyte's canonical unit."""

    result_id: str
    analyte: str
    value: Decimal
    value_as_sent: float
    unit_as_sent: str
    uln: Decimal
    # "protocol_default_implausible_site_range": the result came with a range
    # no real laboratory reports (a ULN of 1e-30): graded on the default instead.
    uln_origin: Literal["site", "protocol_default", "protocol_default_implausible_site_range"]
    lln: Decimal
    at: datetime
    seq: int
    status: str
    event_id: str
    # Fingerprints of the event ids of earlier versions of this result: a
    # re-sent preliminary after its correction is recognised as long as the
    # result is kept, however long ago it was first sent.
    superseded: list[int] = []

    @property
    def unit(self) -> str:
        return CANONICAL_UNIT[self.analyte]

    @property
    def order(self) -> tuple[datetime, int]:
        return self.at, self.seq


class Series(_State):
    """One analyte's kept results, in clinical-time order ((at, seq) ascending)."""

    results: list[LabResult] = []
    # Clinical time of the newest result forgotten past the retention horizon
    # (None: nothing forgotten). A rule that looks at or before it may miss one.
    forgotten_through: datetime | None = None


class AdverseEventReport(_State):
    """The current version of one adverse event (`ae_id`): the update recorded last."""

    ae_id: str
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
    """The latest state of one alert of a subject, open or (for rules that remember them) resolved."""

    alert_id: str
    rule: str
    key: str
    revision: int
    status: Literal["firing", "resolved"]
    severity: Severity
    started_at: datetime
    ctcae_grade: int | None = None
    report_due_at: datetime | None = None
    support: list[str] = []


class SubjectState(_State, dict=True, gc=True):
    # dict=True: room for indexes built on demand (not encoded); so tracked by the collector.
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
    # 8-byte fingerprints of the most recent event ids, oldest first (see retention.SEEN_EVENT_IDS).
    seen: bytes = b""
    # By analyte.
    labs: dict[str, Series] = {}
    # By ae_id.
    adverse_events: dict[str, AdverseEventReport] = {}
    # Adverse events forgotten past the horizon that counted for the arm-level
    # toxicity monitor: the subject still counts.
    counted_forgotten: int = 0
    # Keyed by "<rule>|<episode key>": the current or last alert of that kind.
    alerts: dict[str, AlertRecord] = {}
    # Keyed as alerts; only for the rules that read them (lab rules).
    closed_episodes: dict[str, list[Episode]] = {}
    # Earliest pending deadline (SBRT window, ...); None while nothing is due.
    next_deadline_at: datetime | None = None
    scans: dict[str, ScanRecord] = {}
    # RECIST 1.1 outcome, recomputed in clinical-time order after each scan:
    # for progression-free survival and objective response rate.
    responses: list[TimepointResponse] = []
    best_overall_response: str | None = None
    progression_at: datetime | None = None

    def series(self, analyte: str) -> Series:
        found = self.labs.get(analyte)
        if found is None:
            found = self.labs[analyte] = Series()
        return found

    def to_bytes(self) -> bytes:
        return encode_state(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> SubjectState:
        return decode_state(data)


class StateHeader(msgspec.Struct, array_like=True):
    """What the worker's indexes need of a state, readable without decoding the state.

    Recovery reads every changelog record of a partition, most of them
    superseded: it reads only this.
    """

    next_deadline_at: datetime | None
    open_alerts: dict[str, int]


# The on-the-wire state, versioned by its first byte:
#   "{"    format 0: the pydantic JSON object main wrote until issue 11 (read, never written);
#   0x01   format 1: header JSON, a newline, state JSON (msgspec arrays).
FORMAT_1 = b"\x01"
_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(StateHeader)
_state_decoder = msgspec.json.Decoder(SubjectState)


def header_of(state: SubjectState) -> StateHeader:
    counts: dict[str, int] = {}
    for alert in state.alerts.values():
        if alert.status == "firing":
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
    return StateHeader(state.next_deadline_at, counts)


def encode_with_header(state: SubjectState) -> tuple[bytes, StateHeader]:
    """The state's record, and the header written in it (for the caller's indexes: computed once)."""
    header = header_of(state)
    return FORMAT_1 + _encoder.encode(header) + b"\n" + _encoder.encode(state), header


def encode_state(state: SubjectState) -> bytes:
    return encode_with_header(state)[0]


def decode_state(data: bytes) -> SubjectState:
    """A state from its record, in whichever format it was written."""
    if data[:1] == FORMAT_1:
        return _state_decoder.decode(data[data.index(b"\n") + 1 :])
    if data[:1] == b"{":
        from trialwatch.engine.migrate import from_format_0

        return from_format_0(data)
    raise ValueError(f"not a subject state: unknown format byte {data[:1]!r}")


def decode_header(data: bytes) -> StateHeader:
    """The header of a state record, without decoding the state (format 0: decoded whole)."""
    if data[:1] == FORMAT_1:
        return _header_decoder.decode(data[1 : data.index(b"\n")])
    return header_of(decode_state(data))
