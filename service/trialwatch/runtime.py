"""How records reach the worker under Faust, and what the timers and pages ask of the running app.

`create_app` (app.py) wires; this module runs: the agents' record loops
(`drive` one record at a time, `drive_batches` for the subjects), the state
store a table becomes for the worker (`TableStates`), and `Runtime`, the one
place that reads Faust's consumer (assignment, high-water marks, the
group's commits) for the deadline ticker, the stall watchdog, the gauges and
the health pages. The decisions themselves are pure and tested apart:
`ticking.TickPolicy`, `watchdog.find_stalls` and `watchdog.SkipDetector`.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import faust
import structlog
from aiokafka.structs import TopicPartition
from faust.streams import _current_event
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from trialwatch.contract import INPUT_TOPICS, TREATMENT
from trialwatch.dsmb.service import DsmbFeed, unacknowledged_gauges
from trialwatch.metrics import Metrics
from trialwatch.records import Record, tick_payload
from trialwatch.settings import Settings
from trialwatch.ticking import TickPolicy
from trialwatch.watchdog import SkipDetector, find_stalls
from trialwatch.worker import SubjectWorker

log = structlog.get_logger("trialwatch.runtime")

# Records stay bytes end to end: decoding is ours (pydantic), so a record
# that is not JSON reaches the dead-letter path instead of failing in Faust.
RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def _exit_for_reprocessing(records: list[Record]) -> None:
    """An exception escaping a Faust agent acks its records and stops the agent while the worker looks healthy.

    Records would be committed unprocessed. Exit at once instead, so the
    offsets stay uncommitted and a restart re-processes the records.
    """
    first = records[0] if records else None
    log.critical(
        "unrecoverable error; exiting so the records are re-processed",
        topic=first.topic if first else None,
        partition=first.partition if first else None,
        offset=first.offset if first else None,
        records=len(records),
        exc_info=True,
    )
    os._exit(70)


def _record(event: Any) -> Record:
    msg = event.message
    return Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.timestamp)


async def drive(stream: faust.StreamT[bytes], handle: Callable[[Record, Any], Awaitable[None]], table: Any) -> None:
    """Hand each record of an agent's stream to `handle` with `table` as its store, one at a time, to completion."""
    async for event in stream.events():
        record = _record(event)
        try:
            await handle(record, TableStates(table, {record.partition: event}))
        except BaseException:  # noqa: BLE001 - logged there, and the process exits
            _exit_for_reprocessing([record])


class TableStates:
    """A table as the worker's state store: reads, and writes to an explicit partition.

    Faust's `table[key] = value` takes the partition from the stream's current
    event; in a batch the current event is some other record's. It also checks
    the changelog's partition count against cluster metadata that, right
    after a new deployment creates the changelog, may not list it yet (seen:
    the first arm fact crashed the worker with PartitionsMismatch). A write here
    goes to the partition given (the subject's, which its records came from),
    in the store (RocksDB picks its per-partition database from the current
    event, so that is set to one of the partition's records) and in the
    changelog, and returns the changelog send: the worker awaits Kafka's
    acknowledgement before the batch's offsets may be committed.
    """

    def __init__(self, table: Any, events_by_partition: dict[int, Any]) -> None:
        self.table = table
        self.events = events_by_partition

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self.table.get(key)
        return value

    def put(self, partition: int, key: bytes, value: bytes) -> Any:
        token = _current_event.set(weakref.ref(self.events[partition]))
        try:
            self.table.data[key] = value
        finally:
            _current_event.reset(token)
        return self.table.send_changelog(partition, key, value)


async def drive_batches(
    stream: faust.StreamT[bytes],
    settings: Settings,
    handle: Callable[[list[Record], TableStates], Awaitable[None]],
    table: Any,
    after: Callable[[list[Record]], Awaitable[None]],
) -> None:
    """Take records in batches; each batch handled to completion, then acked (so Faust may commit it).

    `after` sees each batch once it is acked (to re-read records the consumer skipped).
    """
    # noack_take (not take): take acks each record as it enters the buffer,
    # before the batch is processed; here nothing is acked until it is done.
    batches = stream.noack_take(settings.batch_max_records, within=settings.batch_wait_s)  # type: ignore[attr-defined]
    async for events in batches:
        records = [_record(event) for event in events]
        try:
            await handle(records, TableStates(table, {event.message.partition: event for event in events}))
        except BaseException:  # noqa: BLE001 - logged there, and the process exits
            _exit_for_reprocessing(records)
        for event in events:
            await stream.ack(event)
        await after(records)


class Runtime:
    """The running app as the timers and pages see it: Faust's consumer is read here and nowhere else."""

    def __init__(self, app: faust.App, worker: SubjectWorker, metrics: Metrics, settings: Settings) -> None:
        self.app = app
        self.worker = worker
        self.metrics = metrics
        self.settings = settings
        self.ticks = app.topic(settings.ticks_topic, **RAW)
        self.tick_policy = TickPolicy(max_defer_s=settings.tick_max_defer_s)
        self.skips = SkipDetector()
        self.watched = (*INPUT_TOPICS, settings.ticks_topic, settings.arm_facts_topic)
        self.tried: dict[Any, tuple[int, int]] = {}
        # A rebalance pauses the agent: idleness counts from the later of the
        # last record and the last generation change, so a pause is never a stall.
        self.generation: Any = None
        self.generation_since = time.monotonic()

    def consuming(self) -> bool:
        """Tables recovered and partitions assigned, no rebalance under way."""
        app = self.app
        return bool(app.consumer.assignment()) and not app.rebalancing and app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]

    def processed_upto(self, tp: Any) -> int:
        """Next offset of `tp` to process: the further of this worker's own count and the group's commit.

        Our count runs ahead of the commit between commits; the commit runs
        ahead of our count when the partition was owned by another worker in
        between (our count is then stale).
        """
        own = self.worker.next_offset.get((tp.topic, tp.partition), 0)
        committed = self.app.consumer._committed_offset.get(tp) or 0  # type: ignore[attr-defined]
        return max(own, committed)

    def treatment_behind(self, partition: int) -> bool:
        tp = TopicPartition(TREATMENT, partition)
        highwater = self.app.consumer.highwater(tp)
        return highwater is not None and highwater > self.processed_upto(tp)

    async def tick(self) -> None:
        """Send a tick for each subject whose deadline is due, to the partition its state lives in."""
        if not self.consuming():
            return
        worker, policy = self.worker, self.tick_policy
        owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic in INPUT_TOPICS}
        self.metrics.pending_deadlines.set(worker.deadlines.pending(owned))
        now = datetime.now(UTC)
        for partition, key, deadline in policy.select(
            worker.deadlines.due(owned, now), now, time.monotonic(), self.treatment_behind
        ):
            # The state's partition, whatever partitioner the publisher used.
            await self.ticks.send(key=key, value=tick_payload(key.decode(), deadline), partition=partition)
            policy.ticked(key, deadline, time.monotonic())
            self.metrics.ticks_sent.inc()

    async def reread_skipped(self, records: list[Record]) -> None:
        """Seek back to records the consumer skipped in the middle of a partition (see watchdog.py)."""
        coordinates = [(r.topic, r.partition, r.offset) for r in records]
        for skip in self.skips.check(self.app.consumer_generation_id, coordinates):
            # Commits stay at the skipped record (faust_fixes) until it is processed.
            log.warning(
                "records skipped by the consumer; re-reading them",
                topic=skip.topic,
                partition=skip.partition,
                first=skip.first,
                next_seen=skip.next_seen,
            )
            self.metrics.stalls_recovered.labels(skip.topic).inc()
            await self.app.consumer.seek(TopicPartition(skip.topic, skip.partition), skip.first)

    async def check_stalls(self) -> None:
        """Seek back where records sit beyond the committed offset while the agent is idle."""
        app, worker = self.app, self.worker
        if not self.consuming():
            return
        if app.consumer_generation_id != self.generation:
            self.generation, self.generation_since = app.consumer_generation_id, time.monotonic()
            return
        consumer = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in self.watched]
        if not tps or worker.busy:
            return
        # No broker round trips here: they go through Faust's consumer thread
        # and, seen in a two-worker rebalance, kept recovery from finishing.
        # The cached high-water marks of the fetches are enough. Seeking to 0
        # where the log starts later is safe: the reset policy is earliest.
        stalls = find_stalls(
            {tp: self.processed_upto(tp) for tp in tps},
            {tp: consumer.highwater(tp) for tp in tps},
            idle_s=time.monotonic() - max(worker.last_activity, self.generation_since),
            idle_threshold_s=self.settings.stall_idle_s,
            busy=worker.busy,
            already_tried=self.tried,
        )
        for stall in stalls:
            log.warning(
                "records beyond the committed offset while idle; re-reading them",
                topic=stall.tp.topic,
                partition=stall.tp.partition,
                committed=stall.committed,
                highwater=stall.highwater,
            )
            self.tried[stall.tp] = (stall.committed, stall.highwater)
            self.metrics.stalls_recovered.labels(stall.tp.topic).inc()
            await consumer.seek(stall.tp, stall.committed)

    def update_gauges(self, feed: DsmbFeed) -> None:
        """Lag and open alerts, for the partitions this worker owns now."""
        app, worker, metrics = self.app, self.worker, self.metrics
        if app.rebalancing:
            return
        assigned = [tp for tp in app.consumer.assignment() if tp.topic in INPUT_TOPICS]
        owned = {tp.partition for tp in assigned}
        unacknowledged_gauges(feed, metrics)
        for severity, count in worker.open_alerts.totals(owned).items():
            metrics.open_alerts.labels(severity).set(count)
        now = time.time()
        for tp in assigned:
            highwater = app.consumer.highwater(tp)
            lag = max(0, highwater - self.processed_upto(tp)) if highwater is not None else 0
            last = worker.last_timestamp.get((tp.topic, tp.partition))
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
            metrics.consumer_lag_seconds.labels(tp.topic, str(tp.partition)).set(
                max(0.0, now - last) if lag and last is not None else 0.0
            )

    def register_pages(self, registry: CollectorRegistry) -> None:
        """/health, /ready, /live and /metrics."""
        runtime, app, metrics = self, self.app, self.metrics

        def ready() -> bool:
            consuming = runtime.consuming()
            metrics.ready.set(1 if consuming else 0)
            return consuming

        @app.page("/health")
        class Health(View):
            async def get(self, request: Request) -> Response:
                return self.json({"status": "ok", "consuming": ready()})

        @app.page("/ready")
        class Ready(View):
            """Readiness: tables recovered and partitions assigned; 503 until then (and during rebalances)."""

            async def get(self, request: Request) -> Response:
                ok = ready()
                return self.json({"ready": ok}, status=200 if ok else 503)

        @app.page("/live")
        class Live(View):
            """Liveness: the worker has not crashed or begun stopping (an agent error exits the process)."""

            async def get(self, request: Request) -> Response:
                alive = not app.should_stop and not app.crashed
                return self.json({"alive": alive}, status=200 if alive else 503)

        @app.page("/metrics")
        class PrometheusMetrics(View):
            async def get(self, request: Request) -> Response:
                ready()
                # aiohttp wants the charset apart from the content type.
                text = generate_latest(registry).decode()
                return self.text(text, content_type=CONTENT_TYPE_LATEST.split(";")[0])
