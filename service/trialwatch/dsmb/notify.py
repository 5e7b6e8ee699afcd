"""What the webhook notifier owes each receiver, decided from an alert's history alone (pure; no I/O).

Every revision of every alert goes to every primary receiver, in revision
order (a receiver never hears "resolved" before "firing"). A critical alert
nobody has acknowledged for `escalate_after` is sent once more, marked as an
escalation, to the primary and the escalation receivers. A delivery is done
once the ledger holds its outcome; the planner is asked again after every
change, so an acknowledgement stops an escalation that has not gone out yet.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from trialwatch.contract import AlertMessage
from trialwatch.dsmb.book import AlertHistory

SIGNATURE_HEADER = "X-Trialwatch-Signature-256"
DELIVERY_HEADER = "X-Trialwatch-Delivery"
KIND_HEADER = "X-Trialwatch-Notification"


@dataclass(frozen=True)
class Receiver:
    """A webhook URL. `key` names it in delivery ids without putting the URL (maybe with a secret) in the ledger."""

    group: Literal["primary", "escalation"]
    url: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One delivery owed: this alert state, to this receiver, as an alert or as an escalation."""

    delivery_id: str
    alert: AlertMessage
    kind: Literal["alert", "escalation"]
    receiver: Receiver

    @property
    def body(self) -> bytes:
        return self.alert.model_dump_json().encode()


def delivery_id(alert_id: str, revision: int, kind: str, receiver: Receiver) -> str:
    """Deterministic, so a delivery recorded by one worker is recognised by any other after a restart."""
    material = f"{alert_id}\x1f{revision}\x1f{kind}\x1f{receiver.key}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value: HMAC-SHA256 of the exact body bytes, hex, as `sha256=<hex>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does with the header (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), header)


def owed(
    history: AlertHistory[AlertMessage],
    primary: Sequence[Receiver],
    escalation: Sequence[Receiver],
    escalate_after: timedelta,
    now: datetime,
) -> tuple[list[Job], datetime | None]:
    """The deliveries due now for one alert, and when the next one (an escalation) falls due, if later.

    Per receiver only the first undelivered revision is due: the next waits
    until that one is delivered or given up.
    """
    jobs: list[Job] = []
    for receiver in primary:
        for rev in history.revisions:
            did = delivery_id(rev.alert_id, rev.revision, "alert", receiver)
            if did not in history.deliveries:
                jobs.append(Job(did, rev, "alert", receiver))
                break
    current = history.current
    critical_since = history.critical_since
    if critical_since is None or current.status != "firing" or history.acknowledgement is not None:
        return jobs, None
    due = critical_since + escalate_after
    if now < due:
        return jobs, due
    for receiver in (*primary, *escalation):
        did = delivery_id(current.alert_id, current.revision, "escalation", receiver)
        if did not in history.deliveries:
            jobs.append(Job(did, current, "escalation", receiver))
    return jobs, None


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: doubling from `initial_s`, capped at `max_s`."""
    return float(min(max_s, initial_s * 2 ** max(0, attempts - 1)))
