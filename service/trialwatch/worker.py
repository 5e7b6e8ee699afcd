"""The thin shell around the engine: decode, look up state, apply, publish, write state.

It knows nothing of Faust either: the Faust agent hands it records, a state
mapping and a send function, so the same code runs under fakes in unit tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from trialwatch.contract import (
    ALERTS,
    ALERTS_MASKED,
    DEAD_LETTER_EXCERPT_BYTES,
    DEADLETTER,
    AlertMessage,
    DeadLetter,
    mask,
    reveals_arm,
)
from trialwatch.decode import Rejection, decode, excerpt
from trialwatch.engine import Engine, SubjectState, Tick
from trialwatch.engine.state import StateHeader, header_of
from trialwatch.engine.toxicity import (
    ArmFact,
    ArmMonitor,
    ArmState,
    can_change_fact,
    changed_fact,
    subject_fact,
)
from trialwatch.failures import where
from trialwatch.metrics import Metrics, alert_labels, site_label

# send(topic, key, value) hands a record to the producer and returns an
# awaitable that completes when Kafka has acknowledged it.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]

log = structlog.get_logger("trialwatch.worker")

# A subject's state is one changelog record: it must stay under the broker's
# default max.message.bytes (1,048,588) with room for the record's overhead.
MAX_STATE_BYTES = 900_000


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_s: float | None = None


class DeadlineIndex:
    """Which subjects of which partition have a deadline, and when: what the tick timer scans.

    Kept in memory, rebuilt from the subjects changelog during recovery, so a
    deadline survives restarts and partition moves: the state is the truth,
    this is an index of it.
    """

    def __init__(self) -> None:
        self.by_partition: dict[int, dict[bytes, datetime]] = {}

    def update(self, partition: int, key: bytes, deadline: datetime | None) -> None:
        entries = self.by_partition.setdefault(partition, {})
        if deadline is None:
            entries.pop(key, None)
        else:
            entries[key] = deadline

    def due(self, partitions: set[int], now: datetime) -> list[tuple[int, bytes, datetime]]:
        return [
            (partition, key, deadline)
            for partition in partitions
            for key, deadline in self.by_partition.get(partition, {}).items()
            if deadline <= now
        ]

    def pending(self, partitions: set[int]) -> int:
        return sum(len(self.by_partition.get(p, {})) for p in partitions)


class OpenAlertIndex:
    """Firing alerts by severity per subject, from the subjects' states: right after a restart too."""

    def __init__(self) -> None:
        self.by_partition: dict[int, dict[bytes, dict[str, int]]] = {}

    def update(self, partition: int, key: bytes, counts: dict[str, int]) -> None:
        entries = self.by_partition.setdefault(partition, {})
        if counts:
            entries[key] = counts
        else:
            entries.pop(key, None)

    def totals(self, partitions: set[int]) -> dict[str, int]:
        out = {"info": 0, "warning": 0, "high": 0, "critical": 0}
        for partition in partitions:
            for counts in self.by_partition.get(partition, {}).values():
                for severity, n in counts.items():
                    out[severity] += n
        return out


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


class SubjectWorker:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        send: Send,
        *,
        ticks_topic: str | None = None,
        arm_facts_topic: str | None = None,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.send = send
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        self.ticks_topic = ticks_topic
        self.arm_facts_topic = arm_facts_topic
        self.arm_monitor = ArmMonitor(engine.protocol)
        self.known_sites = frozenset(engine.protocol.sites)
        self.deadlines = DeadlineIndex()
        self.open_alerts = OpenAlertIndex()
        # Kafka timestamp of the last processed record per (topic, partition).
        self.last_timestamp: dict[tuple[str, int], float] = {}
        # Next offset to process per (topic, partition): with the high-water
        # mark, how far behind this worker is.
        self.next_offset: dict[tuple[str, int], int] = {}
        # For the stall watchdog: is a record being handled, and since when is
        # the agent idle.
        self.busy = False
        self.last_activity = time.monotonic()
        # Parsed states by subject key, with the exact bytes object they were
        # saved as: while the table still holds that very object, parsing it
        # again (a third of the per-event cost) gives the same state. After a
        # recovery or a rebalance the table holds other objects: parsed anew.
        self._parsed: dict[bytes, tuple[bytes, SubjectState]] = {}

    def _load(self, key: bytes, states: MutableMapping[bytes, bytes]) -> SubjectState | None:
        """The subject's state, owned by the caller until `_save`.

        The engine updates states in place, so the cached one is taken out
        here and put back only by `_save`: an event that never reaches its
        save (an error, an exit) leaves the saved bytes as the only truth.
        """
        cached = self._parsed.pop(key, None)
        raw = states.get(key)
        if raw is None:
            return None
        if cached is not None and cached[0] is raw:
            return cached[1]
        return SubjectState.from_bytes(raw)

    async def handle(self, record: Record, states: MutableMapping[bytes, bytes]) -> None:
        """Process one input record to completion: its alerts are acknowledged by Kafka on return.

        The caller must not let its offset be committed before this returns;
        Faust acks the record when the agent asks for the next one.
        """
        self.busy = True
        try:
            await self._handle(record, states)
            self.next_offset[(record.topic, record.partition)] = record.offset + 1
            if record.timestamp_s is not None:
                self.last_timestamp[(record.topic, record.partition)] = record.timestamp_s
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    async def _handle(self, record: Record, states: MutableMapping[bytes, bytes]) -> None:
        started = time.perf_counter()
        topic = record.topic
        bound = log.bind(topic=topic, partition=record.partition, offset=record.offset)
        if topic == self.ticks_topic:
            await self._handle_tick(record, states, bound)
            return
        self.metrics.events_consumed.labels(topic).inc()
        event = decode(topic, record.value or b"")
        if isinstance(event, Rejection):
            await self._dead_letter(record, event, bound)
            return
        # Publishers often build event ids from the subject code: log the id
        # with that code masked, so logs never name a subject.
        bound = bound.bind(event_id=event.event_id.replace(event.subject_id, "…"))
        self.metrics.site_last_event.labels(site_label(event.site_id, self.known_sites)).set(time.time())
        if record.key != event.subject_id.encode():
            # A subject's events must all land on its partition, or its state
            # would split between workers and rules would see half the story.
            await self._dead_letter(
                record,
                Rejection(
                    "key_mismatch",
                    "the record key must be the event's subject_id (UTF-8); it is not",
                    [],
                    event.event_id,
                ),
                bound,
            )
            return
        try:
            state = self._load(record.key, states)
            facts = can_change_fact(event)
            before = subject_fact(state, self.engine.protocol, "") if facts and state is not None else None
            state, alerts = self.engine.apply(state, event, self.clock())
            after = subject_fact(state, self.engine.protocol, event.event_id) if facts else None
            raw = state.to_bytes()
        except Exception as exc:  # noqa: BLE001 - a bug must dead-letter the event, not kill the worker
            await self._processing_failed(record, exc, "rule evaluation", event.event_id, bound)
            return
        fact = changed_fact(before, after)
        if fact is not None:
            await self._publish_arm_fact(fact)
        if alerts:
            await self._publish_alerts(alerts, bound)
            if record.timestamp_s is not None and not all(reveals_arm(a.rule) for a in alerts):
                self.metrics.event_to_alert_seconds.observe(max(0.0, time.time() - record.timestamp_s))
        # The state is written after the alerts are acknowledged: a crash in
        # between re-processes the event and re-sends the same (alert_id,
        # revision), never loses it.
        await self._save(record, state, raw, states, event.event_id, bound)
        self.metrics.processing_seconds.observe(time.perf_counter() - started)

    async def _handle_tick(self, record: Record, states: MutableMapping[bytes, bytes], bound: Any) -> None:
        """The wall clock passed a subject's deadline: let the engine decide what is due now."""
        try:
            subject_id = json.loads(record.value or b"")["subject_id"]
            if not record.key or not isinstance(subject_id, str) or record.key != subject_id.encode():
                raise ValueError("not a tick of this record's subject")
            state = self._load(record.key, states)
            if state is None:
                return
            now = self.clock()
            state, alerts = self.engine.apply(state, Tick(subject_id, now), now)
            raw = state.to_bytes()
        except Exception as exc:  # noqa: BLE001 - one policy for every input kind (see _processing_failed)
            # The engine is deterministic: ticking again would fail again. The
            # deadline stays in the state (a restart or the subject's next
            # event re-indexes it); the index stops re-sending it meanwhile.
            if record.key:
                self.deadlines.update(record.partition, record.key, None)
            await self._processing_failed(record, exc, "deadline evaluation", None, bound)
            return
        if alerts:
            await self._publish_alerts(alerts, bound)
        await self._save(record, state, raw, states, None, bound)

    async def _save(
        self,
        record: Record,
        state: SubjectState,
        raw: bytes,
        states: MutableMapping[bytes, bytes],
        event_id: str | None,
        bound: Any,
    ) -> None:
        """Write the subject's state and keep the in-memory indexes of it in step.

        A state too large for a changelog record is not written: Kafka would
        refuse it in Faust's background producer and crash the worker on the
        same record forever. The alerts of the record are out already; the
        record is dead-lettered (processing_error, paged) and the subject
        stays at its last saved state.
        """
        assert record.key is not None
        if len(raw) > MAX_STATE_BYTES:
            error = ValueError(f"subject state of {len(raw):,} bytes is over {MAX_STATE_BYTES:,}: not saved")
            await self._processing_failed(record, error, "saving the subject's state", event_id, bound)
            return
        states[record.key] = raw
        self._parsed[record.key] = (raw, state)
        self.index(record.partition, record.key, header_of(state))

    def index(self, partition: int, key: bytes, header: StateHeader | None) -> None:
        """Deadlines and open alerts of one subject, from its state's header (also called during recovery)."""
        self.deadlines.update(partition, key, header.next_deadline_at if header is not None else None)
        self.open_alerts.update(partition, key, header.open_alerts if header is not None else {})

    async def _publish_arm_fact(self, fact: ArmFact) -> None:
        # Keyed by arm: every fact of an arm meets its counts in one agent.
        if self.arm_facts_topic is not None:
            await self._deliver_all([(self.arm_facts_topic, fact.arm.encode(), json.dumps(asdict(fact)).encode())])

    async def handle_arm_fact(self, record: Record, arms: MutableMapping[bytes, bytes]) -> None:
        """Fold one subject's fact into its arm's counts; publish a boundary alert when crossed."""
        self.busy = True
        bound = log.bind(topic=record.topic, partition=record.partition, offset=record.offset)
        try:
            try:
                fact = ArmFact.from_bytes(record.value or b"")
                raw = arms.get(fact.arm.encode())
                state = ArmState.from_bytes(raw) if raw is not None else None
                state, alerts = self.arm_monitor.apply(state, fact, self.clock())
            except Exception as exc:  # noqa: BLE001 - one policy for every input kind (see _processing_failed)
                await self._processing_failed(record, exc, "the arm-level monitor", None, bound)
            else:
                if alerts:
                    await self._publish_alerts(alerts, bound)
                arms[fact.arm.encode()] = state.to_bytes()
            self.next_offset[(record.topic, record.partition)] = record.offset + 1
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    async def _publish_alerts(self, alerts: list[AlertMessage], bound: Any) -> None:
        out: list[tuple[str, bytes, bytes]] = []
        for alert in alerts:
            key = alert.alert_id.encode()
            out.append((ALERTS, key, alert.model_dump_json().encode()))
            masked = mask(alert)
            if masked is not None:
                out.append((ALERTS_MASKED, key, masked.model_dump_json().encode()))
        await self._deliver_all(out)
        for alert in alerts:
            self.metrics.alerts_produced.labels(*alert_labels(alert.rule, alert.severity, alert.status)).inc()
            if reveals_arm(alert.rule):
                # Logs and metrics are operations' view, and operations are
                # blinded: which record raised an arm-revealing alert, or its
                # severity, would tell the arm (a high alert on a lab is RILD).
                # The DSMB stream is the record of these; no log line.
                continue
            # Alert ids are opaque hashes: safe to log, unlike subject codes.
            bound.info(
                "alert produced",
                alert_id=alert.alert_id,
                rule=alert.rule,
                severity=alert.severity,
                status=alert.status,
                revision=alert.revision,
            )

    async def _processing_failed(
        self, record: Record, exc: Exception, what: str, event_id: str | None, bound: Any
    ) -> None:
        """One policy for an internal error on any input kind (event, tick, arm fact).

        The record is dead-lettered with its coordinates (nothing is lost: it
        can be re-driven once the bug is fixed), counted under
        `processing_error` (which pages operations), and the worker goes on:
        exiting would re-read the same record after every restart. The state
        is not saved, so the subject stays as it was before the record.
        """
        bound.error("internal error; record dead-lettered", error=type(exc).__name__, where=where(exc), during=what)
        rejection = Rejection("processing_error", f"{type(exc).__name__} in {what}", [], event_id)
        # Internal records tell the arm (only SBRT subjects have deadlines; an
        # arm fact names its arm): their dead letter keeps the coordinates and
        # the hash, not the key or the payload. The record stays on its topic.
        internal = record.topic in (self.ticks_topic, self.arm_facts_topic)
        await self._dead_letter(record, rejection, bound, redacted=internal)

    async def _dead_letter(self, record: Record, rejection: Rejection, bound: Any, *, redacted: bool = False) -> None:
        letter = dead_letter_for(record, rejection, self.clock(), redacted=redacted)
        # The detail names fields, never their values: it is safe to log.
        bound.warning("input rejected", reason=rejection.reason, detail=rejection.detail)
        # A redacted letter's Kafka key is empty too: the key is what it hides.
        key = b"" if redacted else record.key or b""
        await self._deliver_all([(DEADLETTER, key, letter.model_dump_json().encode())])
        self.metrics.events_rejected.labels(record.topic, rejection.reason).inc()

    async def _deliver_all(self, records: list[tuple[str, bytes, bytes]]) -> None:
        """Send all, then wait for every acknowledgement; retry failures until Kafka takes them.

        Never gives up: an alert Kafka has not acknowledged must not have its
        input offset committed. A stalled worker shows as lag and pages
        operations; a dropped alert shows nowhere.
        """
        pending = records
        delay = self.retry_initial_s
        while pending:
            futures = [await self.send(topic, key, value) for topic, key, value in pending]
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = [rec for rec, res in zip(pending, results, strict=True) if isinstance(res, BaseException)]
            for topic, _, _ in failed:
                self.metrics.send_retries.labels(topic).inc()
            if failed:
                log.warning("produce failed, retrying", count=len(failed), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            pending = failed
