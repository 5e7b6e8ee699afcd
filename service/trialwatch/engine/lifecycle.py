"""The alert lifecycle shared by every rule: open, escalate, resolve, with deterministic ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trialwatch.contract import SEVERITY_RANK, AlertMessage, Severity
from trialwatch.engine.retention import add_episode
from trialwatch.engine.state import AlertRecord, Episode, SubjectState


def alert_id(trial: str, subject_id: str, rule: str, key: str, opening_event_id: str) -> str:
    """Same inputs, same id: re-processing an event after a crash re-derives the alert it raised.

    The opening event's id is part of the identity so that a new episode after
    a resolution gets a new alert, as the contract asks.
    """
    material = "\x1f".join((trial, subject_id, rule, key, opening_event_id)).encode()
    return hashlib.sha256(material).hexdigest()[:32]


# An alert must fit in a Kafka record whatever a rule put in it: evidence is
# cut to these sizes (the contract already bounds every input string, so
# only a rule gathering very many items, e.g. event ids over years, reaches them).
MAX_EVIDENCE_LIST = 100
MAX_EVIDENCE_TEXT = 1_000
MAX_SUMMARY = 1_000


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded(value: Any, depth: int = 0) -> Any:
    """`value` with every list cut to MAX_EVIDENCE_LIST items and every string to MAX_EVIDENCE_TEXT characters.

    A cut list ends with one marker string saying how many items were left
    out, so a reader knows the evidence is partial.
    """
    if isinstance(value, str):
        return clip(value, MAX_EVIDENCE_TEXT)
    if depth > 8:
        return "… (nested too deeply)"
    if isinstance(value, dict):
        return {bounded(k, depth + 1): bounded(v, depth + 1) for k, v in list(value.items())[:MAX_EVIDENCE_LIST]}
    if isinstance(value, list | tuple):
        items = [bounded(v, depth + 1) for v in value[:MAX_EVIDENCE_LIST]]
        if len(value) > MAX_EVIDENCE_LIST:
            items.append(f"… and {len(value) - MAX_EVIDENCE_LIST} more")
        return items
    return value


@dataclass(frozen=True, slots=True)
class Memory:
    """What rules remember of resolved alerts, as they declare it (see retention)."""

    # Rules whose resolved alert record is kept (a rule that fires once per subject).
    resolved: frozenset[str]
    # Rules whose closed episodes are kept (a late result inside one does not reopen it).
    episodes: frozenset[str]


class AlertBook:
    """Applies lifecycle transitions to a subject's alert records and collects the messages.

    One book per `apply` call: it stamps every message with the same clinical
    and service time.
    """

    def __init__(
        self,
        state: SubjectState,
        trial: str,
        occurred_at: datetime,
        now: datetime,
        memory: Memory,
    ) -> None:
        self.state = state
        self.trial = trial
        self.occurred_at = occurred_at
        self.now = now
        self.memory = memory
        self.messages: list[AlertMessage] = []

    def open_record(self, rule: str, key: str) -> AlertRecord | None:
        rec = self.state.alerts.get(f"{rule}|{key}")
        return rec if rec is not None and rec.status == "firing" else None

    def covered_by_closed_episode(self, rule: str, key: str, at: datetime) -> bool:
        episodes = self.state.closed_episodes.get(f"{rule}|{key}", ())
        return any(ep.started_at <= at <= ep.ended_at for ep in episodes)

    def open(
        self,
        *,
        rule: str,
        key: str,
        opening_event_id: str,
        severity: Severity,
        started_at: datetime,
        evidence: dict[str, Any],
        summary: str,
        ctcae_grade: int | None = None,
        report_due_at: datetime | None = None,
        support: list[str] | None = None,
        occurred_at: datetime | None = None,
    ) -> AlertRecord:
        rec = AlertRecord(
            alert_id=alert_id(self.trial, self.state.subject_id, rule, key, opening_event_id),
            rule=rule,
            key=key,
            revision=1,
            status="firing",
            severity=severity,
            ctcae_grade=ctcae_grade,
            report_due_at=report_due_at,
            support=support or [],
            started_at=started_at,
        )
        self.state.alerts[f"{rule}|{key}"] = rec
        self._emit(rec, evidence, summary, occurred_at)
        return rec

    def escalate(
        self,
        rec: AlertRecord,
        *,
        severity: Severity,
        evidence: dict[str, Any],
        summary: str,
        ctcae_grade: int | None = None,
    ) -> bool:
        """Raise the severity; a same-or-lower severity while open produces nothing (contract)."""
        if SEVERITY_RANK[severity] <= SEVERITY_RANK[rec.severity]:
            return False
        rec.severity = severity
        rec.revision += 1
        if ctcae_grade is not None:
            rec.ctcae_grade = ctcae_grade
        self._emit(rec, evidence, summary)
        return True

    def resolve(self, rec: AlertRecord, *, ended_at: datetime, evidence: dict[str, Any], summary: str) -> None:
        rec.status = "resolved"
        rec.revision += 1
        rec.support = []
        slot = f"{rec.rule}|{rec.key}"
        if rec.rule in self.memory.episodes:
            add_episode(
                self.state.closed_episodes.setdefault(slot, []),
                Episode(started_at=rec.started_at, ended_at=max(ended_at, rec.started_at)),
            )
        if rec.rule not in self.memory.resolved and self.state.alerts.get(slot) is rec:
            # Nothing reads it once resolved: the rule's next episode opens a new alert.
            del self.state.alerts[slot]
        self._emit(rec, evidence, summary)

    def _emit(
        self, rec: AlertRecord, evidence: dict[str, Any], summary: str, occurred_at: datetime | None = None
    ) -> None:
        self.messages.append(
            AlertMessage(
                alert_id=rec.alert_id,
                revision=rec.revision,
                status=rec.status,
                rule=rec.rule,
                severity=rec.severity,
                subject_id=self.state.subject_id,
                site_id=self.state.site_id,
                arm=self.state.arm,
                occurred_at=occurred_at or self.occurred_at,
                raised_at=self.now,
                ctcae_grade=rec.ctcae_grade,
                report_due_at=rec.report_due_at,
                evidence=bounded(evidence),
                summary=clip(summary, MAX_SUMMARY),
            )
        )
