"""The thin shell around the engine: a batch of records computed, delivered, its states written once.

It knows nothing of Faust either: the Faust agent hands it batches of records,
a state store and a send function, so the same code runs under fakes in unit
tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

from trialwatch.contract import reveals_arm
from trialwatch.decode import Rejection
from trialwatch.engine import Engine
from trialwatch.engine.state import StateHeader, encode_with_header
from trialwatch.engine.toxicity import ArmFact, ArmMonitor, ArmState
from trialwatch.failures import where
from trialwatch.metrics import Metrics, alert_labels, site_label
from trialwatch.records import Record, tick_payload
from trialwatch.unit_of_work import Batch, Out, States, SubjectWork, UnitOfWork, as_states

__all__ = ["MAX_STATE_BYTES", "DeadlineIndex", "OpenAlertIndex", "Record", "SubjectWorker", "tick_payload"]

# send(topic, key, value) hands a record to the producer and returns an
# awaitable that completes when Kafka has acknowledged it.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]

log = structlog.get_logger("trialwatch.worker")

# A subject's state is one changelog record: it must stay under the broker's
# default max.message.bytes (1,048,588) with room for the record's overhead.
MAX_STATE_BYTES = 900_000


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


class SubjectWorker:
    """Runs batches: compute (no I/O), deliver every output, write each touched state once.

    The order is what makes at-least-once hold: alerts, arm facts and dead
    letters are acknowledged by Kafka before any state derived from them is
    written, and both before the caller may let the batch's offsets be
    committed. A crash anywhere in between re-processes the records and
    re-sends the same (alert_id, revision), never loses one.
    """

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
        # For the stall watchdog: is a batch being handled, and since when is
        # the agent idle.
        self.busy = False
        self.last_activity = time.monotonic()
        self.work = UnitOfWork(engine, clock, ticks_topic=ticks_topic, arm_facts_topic=arm_facts_topic)

    async def handle(self, record: Record, states: States | MutableMapping[bytes, bytes]) -> None:
        """One record as a batch of one."""
        await self.handle_batch([record], states)

    async def handle_batch(self, records: list[Record], states: States | MutableMapping[bytes, bytes]) -> None:
        """Process records to completion: on return, everything they lead to is acknowledged by Kafka.

        The caller must not let their offsets be committed before this returns.
        """
        store = as_states(states)
        self.busy = True
        try:
            started = time.perf_counter()
            batch = self.work.compute(records, store)
            saves = self._serialise(batch)
            computed = time.perf_counter() - started
            await self._deliver_all(batch.sends)
            await self._save_all(saves, store)
            self._account(batch, records)
            if records:
                self.metrics.batch_records.observe(len(records))
                per_record = computed / len(records)
                for _ in records:
                    self.metrics.processing_seconds.observe(per_record)
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    def _serialise(self, batch: Batch) -> list[tuple[SubjectWork, bytes, StateHeader]]:
        """Each touched subject's state as it will be written.

        A state too large for a changelog record is not written: Kafka would
        refuse it in Faust's background producer and crash the worker on the
        same record forever. The subject's last record is dead-lettered
        (processing_error, paged) and the subject stays at its last saved
        state; the alerts already computed still go out.
        """
        out: list[tuple[SubjectWork, bytes, StateHeader]] = []
        for work in batch.subjects.values():
            if work.state is None or work.last is None:
                continue
            raw, header = encode_with_header(work.state)
            if len(raw) > MAX_STATE_BYTES:
                error = ValueError(f"subject state of {len(raw):,} bytes is over {MAX_STATE_BYTES:,}: not saved")
                self.work.failed(batch, work.last, error, "saving the subject's state", work.last_event_id)
                continue
            out.append((work, raw, header))
        return out

    async def _save_all(self, saves: list[tuple[SubjectWork, bytes, StateHeader]], store: States) -> None:
        """Write each state once, to its subject's partition, and wait until Kafka has them all."""
        await self._retry_until_acked(
            saves, lambda item: store.put(item[0].partition, item[0].key, item[1]), lambda _: "changelog"
        )
        for work, raw, header in saves:
            assert work.state is not None
            self.work.parsed[work.key] = (raw, work.state)
            self.index(work.partition, work.key, header)

    def _account(self, batch: Batch, records: list[Record]) -> None:
        """Metrics and log lines of a delivered batch, and how far each partition got."""
        for record in records:
            self.next_offset[(record.topic, record.partition)] = record.offset + 1
            if record.timestamp_s is not None:
                self.last_timestamp[(record.topic, record.partition)] = record.timestamp_s
        for topic, n in batch.consumed.items():
            self.metrics.events_consumed.labels(topic).inc(n)
        now = time.time()
        for site in batch.sites:
            self.metrics.site_last_event.labels(site_label(site, self.known_sites)).set(now)
        for failure in batch.failures:
            self._log_failure(failure.record, failure.rejection, failure.error, failure.during)
            if failure.record.topic == self.ticks_topic and failure.record.key:
                # The engine is deterministic: ticking again would fail again.
                # The deadline stays in the state (a restart or the subject's
                # next event re-indexes it); the index stops re-sending it.
                self.deadlines.update(failure.record.partition, failure.record.key, None)
        for produced in batch.produced:
            self._log_alert(produced.alert, produced.record)
        for at in batch.alerted_at:
            self.metrics.event_to_alert_seconds.observe(max(0.0, now - at))

    def _log_failure(self, record: Record, rejection: Rejection, error: Exception | None, during: str | None) -> None:
        bound = log.bind(topic=record.topic, partition=record.partition, offset=record.offset)
        if error is not None:
            bound.error(
                "internal error; record dead-lettered", error=type(error).__name__, where=where(error), during=during
            )
        # The detail names fields, never their values: it is safe to log.
        bound.warning("input rejected", reason=rejection.reason, detail=rejection.detail)
        self.metrics.events_rejected.labels(record.topic, rejection.reason).inc()

    def _log_alert(self, alert: Any, record: Record) -> None:
        self.metrics.alerts_produced.labels(*alert_labels(alert.rule, alert.severity, alert.status)).inc()
        if reveals_arm(alert.rule):
            # Logs and metrics are operations' view, and operations are
            # blinded: which record raised an arm-revealing alert, or its
            # severity, would tell the arm (a high alert on a lab is RILD).
            # The DSMB stream is the record of these; no log line.
            return
        # Alert ids are opaque hashes: safe to log, unlike subject codes.
        log.info(
            "alert produced",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            alert_id=alert.alert_id,
            rule=alert.rule,
            severity=alert.severity,
            status=alert.status,
            revision=alert.revision,
        )

    def index(self, partition: int, key: bytes, header: StateHeader | None) -> None:
        """Deadlines and open alerts of one subject, from its state's header (also called during recovery)."""
        self.deadlines.update(partition, key, header.next_deadline_at if header is not None else None)
        self.open_alerts.update(partition, key, header.open_alerts if header is not None else {})

    async def handle_arm_fact(self, record: Record, arms: States | MutableMapping[bytes, bytes]) -> None:
        """Fold one subject's fact into its arm's counts; publish a boundary alert when crossed."""
        store = as_states(arms)
        self.busy = True
        batch = Batch()
        state: ArmState | None = None
        fact: ArmFact | None = None
        try:
            try:
                fact = ArmFact.from_bytes(record.value or b"")
                raw = store.get(fact.arm.encode())
                state, alerts = self.arm_monitor.apply(
                    ArmState.from_bytes(raw) if raw is not None else None, fact, self.clock()
                )
            except Exception as exc:  # noqa: BLE001 - one policy for every input kind (see UnitOfWork.failed)
                self.work.failed(batch, record, exc, "the arm-level monitor", None)
            else:
                self.work.alerts(batch, alerts, record)
            await self._deliver_all(batch.sends)
            if state is not None and fact is not None:
                key, value = fact.arm.encode(), state.to_bytes()
                await self._retry_until_acked(
                    [value], lambda v: store.put(record.partition, key, v), lambda _: "changelog"
                )
            self._account(batch, [record])
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    async def _deliver_all(self, records: list[Out]) -> None:
        """Send all, then wait for every acknowledgement; retry failures until Kafka takes them.

        Never gives up: an alert Kafka has not acknowledged must not have its
        input offset committed. A stalled worker shows as lag and pages
        operations; a dropped alert shows nowhere.
        """

        async def send(rec: Out) -> Any:
            return await self.send(*rec)

        await self._retry_until_acked(records, send, lambda rec: rec[0])

    async def _retry_until_acked(
        self, items: Iterable[Any], send: Callable[[Any], Any], topic_of: Callable[[Any], str]
    ) -> None:
        pending = list(items)
        delay = self.retry_initial_s
        while pending:
            futures = []
            for item in pending:
                fut = send(item)
                if asyncio.iscoroutine(fut):
                    fut = await fut
                futures.append(fut)
            results = await asyncio.gather(*(f for f in futures if f is not None), return_exceptions=True)
            waited = iter(results)
            outcomes = [next(waited) if f is not None else None for f in futures]
            failed = [item for item, res in zip(pending, outcomes, strict=True) if isinstance(res, BaseException)]
            for item in failed:
                self.metrics.send_retries.labels(topic_of(item)).inc()
            if failed:
                log.warning("produce failed, retrying", count=len(failed), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            pending = failed
