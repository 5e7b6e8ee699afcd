"""One batch of input records, computed without I/O: what to send, and which subject states to write.

The handlers here (an event, a tick) are synchronous: they read states, run
the engine and collect outputs; the worker's arm-fact handler reuses their
error policy and alert output. The worker then delivers the
outputs, writes each touched subject's state once, and only then lets the
batch's offsets be committed. Keeping the computation free of awaits is what
makes a batch cheap: no Kafka round trip per record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from trialwatch.contract import (
    ALERTS,
    ALERTS_MASKED,
    DEADLETTER,
    AlertMessage,
    InputEvent,
    mask,
    reveals_arm,
)
from trialwatch.decode import Rejection, decode
from trialwatch.engine import Engine, SubjectState, Tick
from trialwatch.engine.toxicity import can_change_fact, changed_fact, subject_fact
from trialwatch.records import Record, dead_letter_for

# A record to produce: (topic, key, value).
Out = tuple[str, bytes, bytes]


class States(Protocol):
    """Where subject states live: the Faust table in the service, a dict in tests."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, partition: int, key: bytes, value: bytes) -> Any:
        """Write one state to `partition`; may return an awaitable acknowledged by Kafka."""


def as_states(states: Any) -> States:
    """`states` itself when it is a `States`, else the mapping it is (tests) wrapped as one."""
    return states if hasattr(states, "put") else MappingStates(states)


class MappingStates:
    """States in a plain mapping (tests, replay-style drivers): written at once."""

    def __init__(self, mapping: Any) -> None:
        self.mapping = mapping

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self.mapping.get(key)
        return value

    def put(self, partition: int, key: bytes, value: bytes) -> None:
        self.mapping[key] = value


@dataclass(slots=True)
class SubjectWork:
    """One subject's part of a batch: where it started, and the inputs applied to it since."""

    key: bytes
    partition: int
    saved: bytes | None
    state: SubjectState | None
    applied: list[tuple[InputEvent | Tick, datetime]] = field(default_factory=list)
    last: Record | None = None
    last_event_id: str | None = None

    def roll_back(self, engine: Engine) -> None:
        """Back to the state after the last input that succeeded (the engine updates states in place).

        The engine is deterministic: re-applying the inputs that succeeded
        before gives the same state; their outputs were collected already.
        """
        state = SubjectState.from_bytes(self.saved) if self.saved is not None else None
        for item, now in self.applied:
            state, _ = engine.apply(state, item, now)
        self.state = state


@dataclass(frozen=True, slots=True)
class Produced:
    """An alert sent for a record: counted and logged once Kafka has it."""

    alert: AlertMessage
    record: Record


@dataclass(frozen=True, slots=True)
class Failure:
    """A record dead-lettered: why, for the log line and the counter."""

    record: Record
    rejection: Rejection
    error: Exception | None = None
    during: str | None = None


@dataclass(slots=True)
class Batch:
    """Everything a batch of records leads to, in the order it must reach Kafka."""

    sends: list[Out] = field(default_factory=list)
    subjects: dict[bytes, SubjectWork] = field(default_factory=dict)
    produced: list[Produced] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # Kafka timestamps of records that raised a blinded-safe alert (latency metric).
    alerted_at: list[float] = field(default_factory=list)
    # Per topic, how many input events were consumed (ticks and arm facts excluded).
    consumed: dict[str, int] = field(default_factory=dict)
    # Site of each valid event, for the per-site freshness gauge.
    sites: set[str] = field(default_factory=set)


class UnitOfWork:
    """The handlers: event and tick. Each turns one record into outputs on a `Batch`."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        ticks_topic: str | None,
        arm_facts_topic: str | None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.ticks_topic = ticks_topic
        self.arm_facts_topic = arm_facts_topic
        # Parsed states by key with the bytes object they were saved as: while
        # the store still holds that very object, parsing it again gives the
        # same state (a third of an event's cost). The worker puts each state
        # it saved here.
        self.parsed: dict[bytes, tuple[bytes, SubjectState]] = {}

    def compute(self, records: list[Record], states: States) -> Batch:
        batch = Batch()
        for record in records:
            if record.topic == self.ticks_topic:
                self.tick(record, states, batch)
            else:
                self.event(record, states, batch)
        return batch

    def subject(self, record: Record, states: States, batch: Batch) -> SubjectWork:
        """The subject's work in this batch, its state loaded on first use."""
        assert record.key is not None
        work = batch.subjects.get(record.key)
        if work is None:
            raw = states.get(record.key)
            cached = self.parsed.pop(record.key, None)
            if raw is None:
                state = None
            elif cached is not None and cached[0] is raw:
                state = cached[1]
            else:
                state = SubjectState.from_bytes(raw)
            work = batch.subjects[record.key] = SubjectWork(record.key, record.partition, raw, state)
        return work

    def load(
        self, record: Record, states: States, batch: Batch, during: str, event_id: str | None
    ) -> SubjectWork | None:
        """`subject`, or None with the record dead-lettered when the saved state cannot be read."""
        try:
            return self.subject(record, states, batch)
        except Exception as exc:  # noqa: BLE001 - one policy for every input kind (see failed)
            self.failed(batch, record, exc, during, event_id)
            return None

    def event(self, record: Record, states: States, batch: Batch) -> None:
        batch.consumed[record.topic] = batch.consumed.get(record.topic, 0) + 1
        event = decode(record.topic, record.value or b"")
        if isinstance(event, Rejection):
            self.reject(batch, record, event)
            return
        batch.sites.add(event.site_id)
        if record.key != event.subject_id.encode():
            # A subject's events must all land on its partition, or its state
            # would split between workers and rules would see half the story.
            detail = "the record key must be the event's subject_id (UTF-8); it is not"
            self.reject(batch, record, Rejection("key_mismatch", detail, [], event.event_id))
            return
        work = self.load(record, states, batch, "rule evaluation", event.event_id)
        if work is None:
            return
        facts = can_change_fact(event)
        before = subject_fact(work.state, self.engine.protocol, "") if facts and work.state is not None else None
        alerts = self.apply(batch, work, record, event, "rule evaluation", event.event_id)
        if alerts is None:
            return
        if facts:
            assert work.state is not None
            fact = changed_fact(before, subject_fact(work.state, self.engine.protocol, event.event_id))
            if fact is not None and self.arm_facts_topic is not None:
                # Keyed by arm: every fact of an arm meets its counts in one agent.
                batch.sends.append((self.arm_facts_topic, fact.arm.encode(), json.dumps(asdict(fact)).encode()))
        self.alerts(batch, alerts, record)

    def tick(self, record: Record, states: States, batch: Batch) -> None:
        """The wall clock passed a subject's deadline: let the engine decide what is due now."""
        try:
            subject_id = json.loads(record.value or b"")["subject_id"]
            if not record.key or not isinstance(subject_id, str) or record.key != subject_id.encode():
                raise ValueError("not a tick of this record's subject")
        except Exception as exc:  # noqa: BLE001 - one policy for every input kind (see failed)
            self.failed(batch, record, exc, "deadline evaluation", None)
            return
        work = self.load(record, states, batch, "deadline evaluation", None)
        if work is None or work.state is None:
            return
        now = self.clock()
        alerts = self.apply(batch, work, record, Tick(subject_id, now), "deadline evaluation", None, now)
        if alerts is not None:
            self.alerts(batch, alerts, record)

    def apply(
        self,
        batch: Batch,
        work: SubjectWork,
        record: Record,
        item: InputEvent | Tick,
        during: str,
        event_id: str | None,
        now: datetime | None = None,
    ) -> list[AlertMessage] | None:
        """Run the engine on one input; None (and the record dead-lettered, the state rolled back) on an error."""
        now = now if now is not None else self.clock()
        try:
            work.state, alerts = self.engine.apply(work.state, item, now)
        except Exception as exc:  # noqa: BLE001 - a bug must dead-letter the record, not kill the worker
            work.roll_back(self.engine)
            self.failed(batch, record, exc, during, event_id)
            return None
        work.applied.append((item, now))
        work.last, work.last_event_id = record, event_id
        return alerts

    def alerts(self, batch: Batch, alerts: list[AlertMessage], record: Record) -> None:
        for alert in alerts:
            key = alert.alert_id.encode()
            batch.sends.append((ALERTS, key, alert.model_dump_json().encode()))
            masked = mask(alert)
            if masked is not None:
                batch.sends.append((ALERTS_MASKED, key, masked.model_dump_json().encode()))
            batch.produced.append(Produced(alert, record))
        if alerts and record.timestamp_s is not None and not all(reveals_arm(a.rule) for a in alerts):
            batch.alerted_at.append(record.timestamp_s)

    def failed(self, batch: Batch, record: Record, exc: Exception, during: str, event_id: str | None) -> None:
        """One policy for an internal error on any input kind (event, tick, arm fact).

        The record is dead-lettered with its coordinates (nothing is lost: it
        can be re-driven once the bug is fixed), counted under
        `processing_error` (which pages operations), and the worker goes on:
        exiting would re-read the same record after every restart. The
        subject stays as it was before the record.
        """
        rejection = Rejection("processing_error", f"{type(exc).__name__} in {during}", [], event_id)
        # Internal records tell the arm (only SBRT subjects have deadlines; an
        # arm fact names its arm): their dead letter keeps the coordinates and
        # the hash, not the key or the payload. The record stays on its topic.
        internal = record.topic in (self.ticks_topic, self.arm_facts_topic)
        self.reject(batch, record, rejection, redacted=internal, error=exc, during=during)

    def reject(
        self,
        batch: Batch,
        record: Record,
        rejection: Rejection,
        *,
        redacted: bool = False,
        error: Exception | None = None,
        during: str | None = None,
    ) -> None:
        letter = dead_letter_for(record, rejection, self.clock(), redacted=redacted)
        # A redacted letter's Kafka key is empty too: the key is what it hides.
        key = b"" if redacted else record.key or b""
        batch.sends.append((DEADLETTER, key, letter.model_dump_json().encode()))
        batch.failures.append(Failure(record, rejection, error, during))
