"""Input records as the worker sees them, and the dead letter a rejected one becomes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from trialwatch.contract import DEAD_LETTER_EXCERPT_BYTES, DeadLetter
from trialwatch.decode import Rejection, excerpt


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_s: float | None = None


def dead_letter_for(
    record: Record, rejection: Rejection, rejected_at: datetime, *, redacted: bool = False
) -> DeadLetter:
    """The dead letter of a record: bounded whatever the record's size (its start, length and hash).

    `redacted`: no key and no payload, only the length and hash (for records that must not be shown).
    """
    value = record.value or b""
    payload, truncated = ("", bool(value)) if redacted else excerpt(value, DEAD_LETTER_EXCERPT_BYTES)
    return DeadLetter(
        reason=rejection.reason,
        detail=rejection.detail,
        errors=rejection.errors,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=None if redacted else excerpt(record.key, 256)[0],
        payload=payload or "",
        payload_bytes=len(value),
        payload_sha256=hashlib.sha256(value).hexdigest(),
        payload_truncated=truncated,
        event_id=rejection.event_id,
        rejected_at=rejected_at,
    )


def tick_payload(subject_id: str, due_at: datetime) -> bytes:
    return json.dumps({"subject_id": subject_id, "due_at": due_at.isoformat()}).encode()
