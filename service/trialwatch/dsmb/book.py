"""The DSMB's view of the alert streams: every revision, acknowledgement and webhook delivery of every alert.

Pure: it is fed records and answers queries; the Kafka reader that feeds it
lives in `dsmb.service`. Every worker keeps a complete book (alerts are few:
hundreds in a trial, not millions), so any worker can answer the API.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trialwatch.contract import SEVERITY_RANK, AlertAck, AlertMessage, MaskedAlertMessage

Message = TypeVar("Message", AlertMessage, MaskedAlertMessage)

FILTERS = ("status", "severity", "rule", "subject_id", "site_id")
"""Query parameters `GET /alerts` filters on; each takes one value or a comma-separated list."""


class Delivery(BaseModel):
    """The outcome of one webhook delivery, as kept in the notifier's ledger topic (keyed by `delivery_id`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delivery_id: str
    alert_id: str
    revision: int
    kind: Literal["alert", "escalation"]
    receiver: str
    outcome: Literal["delivered", "gave_up"]
    attempts: int
    at: datetime


def ack_id(alert_id: str, revision: int) -> str:
    """Deterministic: the same alert state acknowledged twice has one id."""
    return hashlib.sha256(f"ack\x1f{alert_id}\x1f{revision}".encode()).hexdigest()[:32]


@dataclass
class AlertHistory(Generic[Message]):
    """Every revision of one alert, oldest first, with its acknowledgements and deliveries."""

    revisions: list[Message] = field(default_factory=list)
    acks: list[AlertAck] = field(default_factory=list)
    deliveries: dict[str, Delivery] = field(default_factory=dict)

    @property
    def current(self) -> Message:
        return self.revisions[-1]

    @property
    def acknowledgement(self) -> AlertAck | None:
        """The acknowledgement of the current state, if any.

        A new firing revision means the severity rose: what was acknowledged
        before is not what is firing now. A resolution needs no acknowledgement,
        so a resolved alert shows the acknowledgement of its last firing state.
        """
        if not self.revisions:
            return None
        firing = [r.revision for r in self.revisions if r.status == "firing"]
        if not firing:
            # Compaction kept only the resolution: the latest acknowledgement
            # is the best account of what was acknowledged.
            return self.acks[-1] if self.acks else None
        needed = max(firing)
        for ack in self.acks:
            if ack.revision >= needed:
                return ack
        return None

    @property
    def critical_since(self) -> datetime | None:
        """When the alert first fired at critical severity (severity only rises while it is open)."""
        for r in self.revisions:
            if r.status == "firing" and r.severity == "critical":
                return r.raised_at
        return None


class AlertBook(Generic[Message]):
    """Alerts by id, built from one alert topic (DSMB or masked) plus acknowledgements and deliveries."""

    def __init__(self, model: type[Message]) -> None:
        self.model: type[Message] = model
        self.alerts: dict[str, AlertHistory[Message]] = {}
        # Acks and deliveries may be read before the alert they name (the
        # topics are read side by side); they wait here until it arrives.
        self._early_acks: dict[str, list[AlertAck]] = {}
        self._early_deliveries: dict[str, list[Delivery]] = {}

    def add_alert(self, raw: bytes) -> Message | None:
        """Fold in one alert record; returns the message if it was a new revision, None for a repeat or junk."""
        try:
            msg: Message = self.model.model_validate_json(raw)
        except ValidationError:
            return None
        history = self.alerts.get(msg.alert_id)
        if history is None:
            history = self.alerts[msg.alert_id] = AlertHistory()
            for ack in self._early_acks.pop(msg.alert_id, []):
                self._add_ack(history, ack)
            for delivery in self._early_deliveries.pop(msg.alert_id, []):
                history.deliveries[delivery.delivery_id] = delivery
        # At-least-once: a revision may be re-sent after a crash. Records of
        # one alert share a partition, so revisions arrive in order.
        if any(r.revision == msg.revision for r in history.revisions):
            return None
        history.revisions.append(msg)
        history.revisions.sort(key=lambda r: r.revision)
        return msg

    def add_ack(self, ack: AlertAck) -> bool:
        """Fold in an acknowledgement; False when it was already known."""
        history = self.alerts.get(ack.alert_id)
        if history is None:
            early = self._early_acks.setdefault(ack.alert_id, [])
            if any(a.ack_id == ack.ack_id for a in early):
                return False
            early.append(ack)
            return True
        return self._add_ack(history, ack)

    @staticmethod
    def _add_ack(history: AlertHistory[Message], ack: AlertAck) -> bool:
        if any(a.ack_id == ack.ack_id for a in history.acks):
            return False
        history.acks.append(ack)
        return True

    def add_delivery(self, delivery: Delivery) -> None:
        history = self.alerts.get(delivery.alert_id)
        if history is None:
            self._early_deliveries.setdefault(delivery.alert_id, []).append(delivery)
        else:
            history.deliveries[delivery.delivery_id] = delivery

    def get(self, alert_id: str) -> AlertHistory[Message] | None:
        return self.alerts.get(alert_id)

    def query(self, filters: Mapping[str, str] | None = None) -> list[AlertHistory[Message]]:
        """Alerts matching every filter, most urgent first: severity, then the longest open.

        Unknown filter names raise ValueError (a typo must not silently return
        everything).
        """
        wanted: dict[str, set[str]] = {}
        for name, value in (filters or {}).items():
            if name not in FILTERS:
                raise ValueError(f"unknown filter {name!r}; filters are {', '.join(FILTERS)}")
            wanted[name] = {v.strip() for v in value.split(",") if v.strip()}
        found = [h for h in self.alerts.values() if _matches(h.current, wanted)]
        found.sort(key=lambda h: (-SEVERITY_RANK[h.current.severity], h.revisions[0].raised_at, h.current.alert_id))
        return found

    def unacknowledged(self, severity: str) -> Iterable[AlertHistory[Message]]:
        """Firing alerts of `severity` whose current state nobody has acknowledged."""
        for h in self.alerts.values():
            if h.current.status == "firing" and h.current.severity == severity and h.acknowledgement is None:
                yield h


def _matches(alert: AlertMessage | MaskedAlertMessage, wanted: Mapping[str, set[str]]) -> bool:
    return all(str(getattr(alert, name)) in values for name, values in wanted.items())
