"""The thin shell around the engine: decode, look up state, apply, publish, write state.

It knows nothing of Faust either: the Faust agent hands it records, a state
mapping and a send function, so the same code runs under fakes in unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from trialwatch.contract import ALERTS, ALERTS_MASKED, DEADLETTER, AlertMessage, DeadLetter, mask
from trialwatch.decode import Rejection, decode, printable
from trialwatch.engine import Engine, SubjectState
from trialwatch.metrics import Metrics

# send(topic, key, value) hands a record to the producer and returns an
# awaitable that completes when Kafka has acknowledged it.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]

log = structlog.get_logger("trialwatch.worker")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_s: float | None = None


class SubjectWorker:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        send: Send,
        *,
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
        # For the stall watchdog: is a record being handled, and since when is
        # the agent idle.
        self.busy = False
        self.last_activity = time.monotonic()

    async def handle(self, record: Record, states: MutableMapping[bytes, bytes]) -> None:
        """Process one input record to completion: its alerts are acknowledged by Kafka on return.

        The caller must not let its offset be committed before this returns;
        Faust acks the record when the agent asks for the next one.
        """
        self.busy = True
        try:
            await self._handle(record, states)
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    async def _handle(self, record: Record, states: MutableMapping[bytes, bytes]) -> None:
        started = time.perf_counter()
        topic = record.topic
        self.metrics.events_consumed.labels(topic).inc()
        bound = log.bind(topic=topic, partition=record.partition, offset=record.offset)
        event = decode(topic, record.value or b"")
        if isinstance(event, Rejection):
            await self._dead_letter(record, event, bound)
            return
        bound = bound.bind(event_id=event.event_id)
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
            raw = states.get(record.key)
            state = SubjectState.from_bytes(raw) if raw is not None else None
            state, alerts = self.engine.apply(state, event, self.clock())
        except Exception as exc:  # noqa: BLE001 - a bug must dead-letter the event, not kill the worker
            bound.exception("engine failed on a valid event")
            await self._dead_letter(
                record,
                Rejection("processing_error", f"{type(exc).__name__} in rule evaluation", [], event.event_id),
                bound,
            )
            return
        if alerts:
            await self._publish_alerts(alerts)
            for alert in alerts:
                # Alert ids are opaque hashes: safe to log, unlike subject codes.
                bound.info(
                    "alert produced",
                    alert_id=alert.alert_id,
                    rule=alert.rule,
                    severity=alert.severity,
                    status=alert.status,
                    revision=alert.revision,
                )
            if record.timestamp_s is not None:
                self.metrics.event_to_alert_seconds.observe(max(0.0, time.time() - record.timestamp_s))
        # The state is written after the alerts are acknowledged: a crash in
        # between re-processes the event and re-sends the same (alert_id,
        # revision), never loses it.
        states[record.key] = state.to_bytes()
        self.metrics.processing_seconds.observe(time.perf_counter() - started)

    async def _publish_alerts(self, alerts: list[AlertMessage]) -> None:
        out: list[tuple[str, bytes, bytes]] = []
        for alert in alerts:
            key = alert.alert_id.encode()
            out.append((ALERTS, key, alert.model_dump_json().encode()))
            masked = mask(alert)
            if masked is not None:
                out.append((ALERTS_MASKED, key, masked.model_dump_json().encode()))
        await self._deliver_all(out)
        for alert in alerts:
            self.metrics.alerts_produced.labels(alert.rule, alert.severity, alert.status).inc()

    async def _dead_letter(self, record: Record, rejection: Rejection, bound: Any) -> None:
        letter = DeadLetter(
            reason=rejection.reason,
            detail=rejection.detail,
            errors=rejection.errors,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=printable(record.key),
            payload=printable(record.value) or "",
            event_id=rejection.event_id,
            rejected_at=self.clock(),
        )
        # The detail names fields, never their values: it is safe to log.
        bound.warning("input rejected", reason=rejection.reason, detail=rejection.detail)
        await self._deliver_all([(DEADLETTER, record.key or b"", letter.model_dump_json().encode())])
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
