"""Reading a state that main wrote before the bounded state (format 0, pydantic JSON).

A rolling upgrade meets changelog records in the old format: each is read
into today's structs, with every open alert, deadline, episode and result
kept, then bounded as if its events had arrived one by one under today's
retention. Written states are always the current format.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from trialwatch.engine import retention
from trialwatch.engine.labs import REMEMBERS_EPISODES
from trialwatch.engine.state import (
    AdverseEventReport,
    AlertRecord,
    Episode,
    LabResult,
    ScanRecord,
    Series,
    SubjectState,
    TimepointResponse,
    TreatmentEvent,
)
from trialwatch.engine.treatment import REMEMBERS_RESOLVED

_TREATMENT_LISTS = (
    "second_line_starts",
    "sbrt_fractions",
    "sbrt_completions",
    "systemic_holds",
    "systemic_resumptions",
    "withdrawals",
)
_SCALARS = (
    "subject_id",
    "site_id",
    "arm",
    "enrolled_event_id",
    "first_line_regimen",
    "enrolled_at",
    "age_years",
    "kps",
    "child_pugh_score",
    "seq",
    "next_deadline_at",
    "best_overall_response",
    "progression_at",
)


def _as(kind: type[Any], value: dict[str, Any]) -> Any:
    """A format-0 object as the struct `kind` (its fields by name; arrays on the wire today)."""
    row: list[Any] = []
    for field in msgspec.structs.fields(kind):
        if field.name in value:
            row.append(value[field.name])
        elif field.default is not msgspec.NODEFAULT:
            row.append(msgspec.to_builtins(field.default))
        elif field.default_factory is not msgspec.NODEFAULT:
            row.append(msgspec.to_builtins(field.default_factory()))
        else:
            raise ValueError(f"format 0 state: {kind.__name__} without {field.name}")
    # strict=False: format 0 wrote decimals and times as JSON strings, as msgspec reads them.
    return msgspec.convert(row, kind, strict=False)


def from_format_0(data: bytes) -> SubjectState:
    old: dict[str, Any] = json.loads(data)
    state: SubjectState = _as(SubjectState, {k: old[k] for k in _SCALARS if k in old})
    for name in _TREATMENT_LISTS:
        setattr(state, name, [_as(TreatmentEvent, item) for item in old.get(name, [])])
    by_analyte: dict[str, list[LabResult]] = {}
    for rid, lab in old.get("labs", {}).items():
        fields = {k: v for k, v in lab.items() if k != "unit"}
        result = _as(LabResult, {**fields, "result_id": rid})
        by_analyte.setdefault(result.analyte, []).append(result)
    state.labs = {a: Series(results=sorted(rs, key=lambda r: r.order)) for a, rs in by_analyte.items()}
    state.adverse_events = {
        key: _as(AdverseEventReport, {**ae, "ae_id": key}) for key, ae in old.get("adverse_events", {}).items()
    }
    alerts = {slot: _as(AlertRecord, rec) for slot, rec in old.get("alerts", {}).items()}
    # Resolved alerts and episodes that no rule reads any more (retention) are left behind.
    state.alerts = {
        slot: rec for slot, rec in alerts.items() if rec.status == "firing" or rec.rule in REMEMBERS_RESOLVED
    }
    state.closed_episodes = {}
    for slot, eps in old.get("closed_episodes", {}).items():
        if slot.split("|", 1)[0] in REMEMBERS_EPISODES:
            for ep in eps:
                retention.add_episode(state.closed_episodes.setdefault(slot, []), _as(Episode, ep))
    state.scans = {sid: _as(ScanRecord, scan) for sid, scan in old.get("scans", {}).items()}
    state.responses = [_as(TimepointResponse, r) for r in old.get("responses", [])]
    _remember_ids(state, old.get("seen_event_ids", []))
    # The engine bounds the results and AEs (it knows the protocol's windows) before its first event.
    state.__dict__["_unbounded"] = True
    return state


def _remember_ids(state: SubjectState, ids: list[str]) -> None:
    """Format 0 kept every id, unordered: the newest known by their records' seq are remembered last."""
    seq_of: dict[str, int] = {}
    for series in state.labs.values():
        seq_of.update((r.event_id, r.seq) for r in series.results)
    seq_of.update((ae.event_id, ae.seq) for ae in state.adverse_events.values())
    seq_of.update((scan.event_id, scan.seq) for scan in state.scans.values())
    for name in _TREATMENT_LISTS:
        seq_of.update((item.event_id, item.seq) for item in getattr(state, name))
    newest = sorted(ids, key=lambda i: (seq_of.get(i, -1), i))[-retention.SEEN_EVENT_IDS :]
    for event_id in newest:
        retention.remember(state, event_id)
