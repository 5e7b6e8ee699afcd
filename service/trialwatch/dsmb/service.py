"""The DSMB side of a worker: the alert feed that keeps the books, acknowledgements, and the webhook notifier.

The feed reads the whole alert, masked, acknowledgement and ledger topics
(every partition, from the beginning, no consumer group), so every worker can
answer the API. One worker at a time runs the notifier: the one that owns
partition 0 of the enrolment topic in the Faust group (`is_leader`), so a
worker that leaves hands notifying over with its partitions. Deliveries are
at-least-once: receivers de-duplicate on the delivery id header.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import aiohttp
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from trialwatch import __version__
from trialwatch.contract import ALERT_ACKS, ALERTS, ALERTS_MASKED, AlertAck, AlertMessage, MaskedAlertMessage
from trialwatch.dsmb.book import AlertBook, Delivery, ack_id
from trialwatch.dsmb.notify import DELIVERY_HEADER, KIND_HEADER, SIGNATURE_HEADER, Job, Receiver, backoff_s, owed, sign
from trialwatch.metrics import Metrics

log = structlog.get_logger("trialwatch.dsmb")

Publish = Callable[[str, bytes, bytes], Awaitable[None]]
"""Send (topic, key, value) and return once Kafka has acknowledged it."""


class DsmbFeed:
    """Folds the alert topics, acknowledgements and the delivery ledger into two books, and keeps reading."""

    def __init__(self, bootstrap: list[str], ledger_topic: str, on_change: Callable[[], None] = lambda: None) -> None:
        self.bootstrap = bootstrap
        self.ledger_topic = ledger_topic
        self.dsmb: AlertBook[AlertMessage] = AlertBook(AlertMessage)
        self.masked: AlertBook[MaskedAlertMessage] = AlertBook(MaskedAlertMessage)
        self.on_change = on_change
        self.caught_up = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._targets: dict[TopicPartition, int] | None = None
        self._synced = asyncio.Event()

    async def run(self) -> None:
        """Read forever; `caught_up` is set once everything present at start has been read."""
        topics = (ALERTS, ALERTS_MASKED, ALERT_ACKS, self.ledger_topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        self._consumer = consumer
        try:
            # A fresh metadata fetch (topics were just created by the worker).
            metadata = await consumer._client.fetch_all_metadata()
            tps = [TopicPartition(t, p) for t in topics for p in sorted(metadata.partitions_for_topic(t) or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._targets = await consumer.end_offsets(tps)
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                changed = False
                for tp, records in batch.items():
                    for rec in records:
                        changed |= self._apply(tp.topic, rec.value or b"")
                if changed:
                    self.on_change()
                targets = self._targets
                # `sync` may set new targets while positions are checked: only
                # the targets that were checked may be declared reached.
                if targets is not None and await self._reached(consumer, targets) and self._targets is targets:
                    self._targets = None
                    self._synced.set()
                    if not self.caught_up.is_set():
                        log.info("alert books loaded", alerts=len(self.dsmb.alerts), masked=len(self.masked.alerts))
                        self.caught_up.set()
        finally:
            self._consumer = None
            await consumer.stop()

    async def sync(self) -> None:
        """Return once everything written to the topics before the call has been read."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("the feed is not running")
        self._synced.clear()
        self._targets = await consumer.end_offsets(list(consumer.assignment()))
        await self._synced.wait()

    @staticmethod
    async def _reached(consumer: AIOKafkaConsumer, targets: dict[TopicPartition, int]) -> bool:
        for tp, end in targets.items():
            if await consumer.position(tp) < end:
                return False
        return True

    def _apply(self, topic: str, value: bytes) -> bool:
        try:
            if topic == ALERTS:
                return self.dsmb.add_alert(value) is not None
            if topic == ALERTS_MASKED:
                return self.masked.add_alert(value) is not None
            if topic == ALERT_ACKS:
                return self.dsmb.add_ack(AlertAck.model_validate_json(value))
            self.dsmb.add_delivery(Delivery.model_validate_json(value))
            return True
        except ValidationError:
            # Not ours to repair; the book keeps what it can read.
            log.warning("unreadable record in a DSMB topic", topic=topic)
            return False


class AckRejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def acknowledge(
    feed: DsmbFeed,
    publish: Publish,
    alert_id: str,
    revision: int,
    acknowledged_by: str,
    comment: str | None,
    now: datetime,
) -> tuple[AlertAck, bool]:
    """Record an acknowledgement of the alert state `revision` (the one the member saw) on `trial.alert-acks.v1`.

    Returns (the acknowledgement, whether it is new). Acknowledging a state
    already acknowledged returns the first acknowledgement and writes nothing.
    Raises AckRejected: 404 for an alert this worker's book does not hold; 409
    when `revision` is not the alert's current firing state (the severity rose
    since the member looked: they must see the new state before acknowledging
    it, or its escalation would be silenced unseen).
    """
    history = feed.dsmb.get(alert_id)
    if history is None:
        raise AckRejected(404, "no such alert")
    existing = history.acknowledgement
    if existing is not None and existing.revision >= revision:
        return existing, False
    firing = [r.revision for r in history.revisions if r.status == "firing"]
    if not firing:
        raise AckRejected(409, "only the resolved state of this alert is kept; there is nothing to acknowledge")
    if revision != max(firing):
        raise AckRejected(
            409, f"revision {revision} is not the alert's current state (revision {max(firing)}); reload and look again"
        )
    ack = AlertAck(
        ack_id=ack_id(alert_id, revision),
        alert_id=alert_id,
        revision=revision,
        acknowledged_by=acknowledged_by,
        comment=comment,
        acknowledged_at=now,
    )
    # Kafka first: the acknowledgement exists once it is in the audit trail.
    await publish(ALERT_ACKS, alert_id.encode(), ack.model_dump_json().encode())
    feed.dsmb.add_ack(ack)
    feed.on_change()
    return ack, True


@dataclass
class _Retry:
    first_at: float
    attempts: int = 0
    next_at: float = 0.0


class Notifier:
    """Delivers what `notify.owed` says is owed, with retries; records outcomes in the ledger topic."""

    def __init__(
        self,
        feed: DsmbFeed,
        publish: Publish,
        metrics: Metrics,
        *,
        ledger_topic: str,
        primary: Sequence[Receiver],
        escalation: Sequence[Receiver],
        secret: bytes,
        escalate_after_s: float,
        timeout_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        give_up_after_s: float,
        is_leader: Callable[[], bool],
        max_in_flight: int = 8,
    ) -> None:
        self.feed = feed
        self.publish = publish
        self.metrics = metrics
        self.ledger_topic = ledger_topic
        self.primary = tuple(primary)
        self.escalation = tuple(escalation)
        self.secret = secret
        self.escalate_after = timedelta(seconds=escalate_after_s)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.give_up_after_s = give_up_after_s
        self.is_leader = is_leader
        self.wake = asyncio.Event()
        self._in_flight: set[str] = set()
        self._retries: dict[str, _Retry] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        await self.feed.caught_up.wait()
        leading = False
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                # Not wait_for: on 3.11 it swallows a cancellation that arrives
                # as the wake-up completes, and a busy notifier (woken after
                # every delivery) then never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.wake.wait()
                self.wake.clear()
                if not self.is_leader():
                    if leading:
                        log.info("notifier handed over: this worker no longer owns the lead partition")
                    leading = False
                    self.metrics.webhook_pending.set(0)
                    continue
                if not leading:
                    # Read what the previous notifier recorded before judging
                    # what is owed, or everything it delivered goes out again.
                    await self.feed.sync()
                    leading = True
                    log.info("notifier running on this worker", receivers=len(self.primary) + len(self.escalation))
                self._dispatch(session)

    def _dispatch(self, session: aiohttp.ClientSession) -> None:
        now = datetime.now(UTC)
        mono = time.monotonic()
        owed_now: set[str] = set()
        for history in list(self.feed.dsmb.alerts.values()):
            jobs, _ = owed(history, self.primary, self.escalation, self.escalate_after, now)
            for job in jobs:
                owed_now.add(job.delivery_id)
                retry = self._retries.get(job.delivery_id)
                if job.delivery_id in self._in_flight or (retry is not None and retry.next_at > mono):
                    continue
                self._in_flight.add(job.delivery_id)
                task = asyncio.create_task(self._attempt(session, job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        # Retry state of deliveries no longer owed (an acknowledgement stopped
        # an escalation, a resolution overtook it) would otherwise stay forever.
        for stale in [d for d in self._retries if d not in owed_now and d not in self._in_flight]:
            del self._retries[stale]
        self.metrics.webhook_pending.set(len(owed_now))

    async def _attempt(self, session: aiohttp.ClientSession, job: Job) -> None:
        async with self._slots:
            try:
                # It may have waited for a slot: still leading, still owed (an
                # acknowledgement may have stopped an escalation meanwhile)?
                if self.is_leader() and self._still_owed(job):
                    await self._deliver(session, job)
            except Exception:
                # A bug here must not stop the notifier; the delivery stays
                # owed, retried after a back-off rather than at once.
                log.error("webhook delivery failed unexpectedly", delivery_id=job.delivery_id, exc_info=True)
                retry = self._retries.setdefault(job.delivery_id, _Retry(first_at=time.monotonic()))
                retry.attempts += 1
                retry.next_at = time.monotonic() + backoff_s(retry.attempts, self.retry_initial_s, self.retry_max_s)
            finally:
                self._in_flight.discard(job.delivery_id)
                self.wake.set()

    def _still_owed(self, job: Job) -> bool:
        history = self.feed.dsmb.get(job.alert.alert_id)
        if history is None:
            return False
        jobs, _ = owed(history, self.primary, self.escalation, self.escalate_after, datetime.now(UTC))
        return any(j.delivery_id == job.delivery_id for j in jobs)

    async def _deliver(self, session: aiohttp.ClientSession, job: Job) -> None:
        body = job.body
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"trialwatch/{__version__}",
            SIGNATURE_HEADER: sign(self.secret, body),
            DELIVERY_HEADER: job.delivery_id,
            KIND_HEADER: job.kind,
        }
        started = time.monotonic()
        status: int | None = None
        error = ""
        try:
            # No redirects: aiohttp would turn the POST into a bodiless GET,
            # answered 200, and the alert would count as delivered.
            async with session.post(job.receiver.url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        self.metrics.webhook_seconds.observe(time.monotonic() - started)
        retry = self._retries.setdefault(job.delivery_id, _Retry(first_at=started))
        retry.attempts += 1
        fields = {
            "delivery_id": job.delivery_id,
            "kind": job.kind,
            "receiver_group": job.receiver.group,
            "receiver": job.receiver.key,
            "revision": job.alert.revision,
            "attempts": retry.attempts,
        }
        if status is not None and 200 <= status < 300:
            await self._record(job, "delivered", retry.attempts)
            log.info("webhook delivered", status=status, **fields)
            return
        if time.monotonic() - retry.first_at >= self.give_up_after_s:
            await self._record(job, "gave_up", retry.attempts)
            log.error("webhook receiver kept failing; delivery given up", status=status, error=error, **fields)
            return
        self.metrics.webhook_deliveries.labels(job.receiver.group, job.kind, "failed").inc()
        wait_s = backoff_s(retry.attempts, self.retry_initial_s, self.retry_max_s)
        retry.next_at = time.monotonic() + wait_s
        log.warning("webhook delivery failed; will retry", status=status, error=error, retry_in_s=wait_s, **fields)

    async def _record(self, job: Job, outcome: Literal["delivered", "gave_up"], attempts: int) -> None:
        self.metrics.webhook_deliveries.labels(job.receiver.group, job.kind, outcome).inc()
        self._retries.pop(job.delivery_id, None)
        delivery = Delivery(
            delivery_id=job.delivery_id,
            alert_id=job.alert.alert_id,
            revision=job.alert.revision,
            kind=job.kind,
            receiver=job.receiver.key,
            outcome=outcome,
            attempts=attempts,
            at=datetime.now(UTC),
        )
        # In the book first, so this process never sends it again; then in
        # the ledger, so no other worker does after a hand-over. A crash in
        # between re-sends it once: at-least-once, de-duplicated by the
        # receiver on the delivery id.
        self.feed.dsmb.add_delivery(delivery)
        for pause in (0.2, 1.0, 5.0, None):
            try:
                await self.publish(self.ledger_topic, job.delivery_id.encode(), delivery.model_dump_json().encode())
                return
            except Exception:  # whatever Kafka raised: retry; the delivery itself is done
                if pause is None:
                    log.error(
                        "could not record a webhook outcome in the ledger", delivery_id=job.delivery_id, exc_info=True
                    )
                    return
                await asyncio.sleep(pause)


def unacknowledged_gauges(feed: DsmbFeed, metrics: Metrics) -> None:
    """Unacknowledged firing alerts and the oldest one's age, per severity (every worker, same figures)."""
    now = datetime.now(UTC)
    for severity in ("info", "warning", "high", "critical"):
        waiting = list(feed.dsmb.unacknowledged(severity))
        metrics.unacknowledged_alerts.labels(severity).set(len(waiting))
        oldest = min((h.current.raised_at for h in waiting), default=None)
        metrics.oldest_unacknowledged_seconds.labels(severity).set(
            max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
        )
