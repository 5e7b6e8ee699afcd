"""The Faust application: one agent over the five input topics, a changelog-backed subjects table."""

from __future__ import annotations

import asyncio
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

from trialwatch.contract import ENROLLMENT, INPUT_TOPICS, TREATMENT
from trialwatch.dsmb import web as dsmb_web
from trialwatch.dsmb.api import DsmbApi, Role
from trialwatch.dsmb.notify import Receiver
from trialwatch.dsmb.service import DsmbFeed, Notifier, unacknowledged_gauges
from trialwatch.engine import Engine
from trialwatch.engine.state import decode_header
from trialwatch.faust_fixes import hold_commits_at_unacknowledged_records
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
from trialwatch.records import Record, tick_payload
from trialwatch.settings import Settings
from trialwatch.ticking import TickPolicy
from trialwatch.watchdog import SkipDetector, find_stalls
from trialwatch.worker import SubjectWorker

log = structlog.get_logger("trialwatch.app")

# Records stay bytes end to end: decoding is ours (pydantic), so a record
# that is not JSON reaches the dead-letter path instead of failing in Faust.
_RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


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


async def _drive(stream: faust.StreamT[bytes], handle: Callable[[Record, Any], Awaitable[None]], table: Any) -> None:
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


async def _drive_batches(
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


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    """Wire the service: settings, protocol, engine, metrics, Faust app, agent and web pages."""
    hold_commits_at_unacknowledged_records()
    reg = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(reg)
    engine = Engine(load_protocol(settings.protocol_file))

    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_list],
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        # Offsets of a new consumer group start at the beginning: an event
        # published before the first worker started is still checked.
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 10,
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        web_host=settings.web_bind,
        # Faust's own pages would serve the subjects table (patient data) and
        # the cluster layout; none of them is meant for anyone.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        # Unprefixed, millisecond metrics; ours are on /metrics.
        debug=False,
        # Raw bytes everywhere by default, so no Faust codec can crash the
        # agent on a record that is not JSON (it would be acked and lost).
        key_serializer="raw",
        value_serializer="raw",
    )

    # Faust derives a table's changelog codecs from key_type/value_type (not
    # from a schema); anything but bytes would make recovery JSON-decode our
    # raw keys, log a warning per record and never finish.
    async def index_deadline(event: Any) -> None:
        # Every changelog record read while recovering a partition (after a
        # restart or when a partition moves here): rebuild the deadline index,
        # so deadlines that passed while no one owned them fire now.
        # Only the record's header is read: most records are superseded
        # versions, and the header is all the indexes need.
        worker.index(event.message.partition, event.key, decode_header(event.value) if event.value else None)

    subjects = app.Table(
        "subjects",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        on_changelog_event=index_deadline,
    )
    consumed = (*INPUT_TOPICS, settings.ticks_topic)
    inputs = app.topic(*consumed, **_RAW)
    outputs: dict[str, faust.TopicT] = {}

    async def send(topic: str, key: bytes, value: bytes) -> Any:
        channel = outputs.get(topic)
        if channel is None:
            channel = outputs[topic] = app.topic(topic, **_RAW)
        return await channel.send(key=key, value=value)

    worker = SubjectWorker(
        engine,
        metrics,
        send,
        ticks_topic=settings.ticks_topic,
        arm_facts_topic=settings.arm_facts_topic,
        retry_initial_s=settings.send_retry_initial_s,
        retry_max_s=settings.send_retry_max_s,
    )

    @app.agent(inputs, name="trialwatch.subjects")
    async def subjects_agent(stream: faust.StreamT[bytes]) -> None:
        await _drive_batches(stream, settings, worker.handle_batch, subjects, reread_skipped)

    skips = SkipDetector()

    async def reread_skipped(records: list[Record]) -> None:
        coordinates = [(r.topic, r.partition, r.offset) for r in records]
        for skip in skips.check(app.consumer_generation_id, coordinates):
            # Commits stay at the skipped record (faust_fixes) until it is processed.
            log.warning(
                "records skipped by the consumer; re-reading them",
                topic=skip.topic,
                partition=skip.partition,
                first=skip.first,
                next_seen=skip.next_seen,
            )
            metrics.stalls_recovered.labels(skip.topic).inc()
            await app.consumer.seek(TopicPartition(skip.topic, skip.partition), skip.first)

    def processed_upto(tp: Any) -> int:
        """Next offset of `tp` to process: the further of this worker's own count and the group's commit.

        Our count runs ahead of the commit between commits; the commit runs
        ahead of our count when the partition was owned by another worker in
        between (our count is then stale).
        """
        own = worker.next_offset.get((tp.topic, tp.partition), 0)
        committed = app.consumer._committed_offset.get(tp) or 0  # type: ignore[attr-defined]
        return max(own, committed)

    ticks = app.topic(settings.ticks_topic, **_RAW)
    tick_policy = TickPolicy(max_defer_s=settings.tick_max_defer_s)

    def treatment_behind(partition: int) -> bool:
        tp = TopicPartition(TREATMENT, partition)
        highwater = app.consumer.highwater(tp)
        return highwater is not None and highwater > processed_upto(tp)

    @app.timer(interval=settings.tick_interval_s)  # type: ignore[untyped-decorator]
    async def deadline_ticker() -> None:
        if app.rebalancing or not consuming():
            return
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic in INPUT_TOPICS}
        metrics.pending_deadlines.set(worker.deadlines.pending(owned))
        now = datetime.now(UTC)
        due = worker.deadlines.due(owned, now)
        for partition, key, deadline in tick_policy.select(due, now, time.monotonic(), treatment_behind):
            # The tick goes to the partition the subject's state lives in,
            # whatever partitioner the publisher used.
            await ticks.send(key=key, value=tick_payload(key.decode(), deadline), partition=partition)
            tick_policy.ticked(key, deadline, time.monotonic())
            metrics.ticks_sent.inc()

    tried: dict[Any, tuple[int, int]] = {}
    # A rebalance pauses the agent: idleness counts from the later of the last
    # record and the last generation change, so a pause is never a stall.
    generation = {"id": None, "since": time.monotonic()}

    @app.timer(interval=settings.stall_check_interval_s)  # type: ignore[untyped-decorator]
    async def stall_watchdog() -> None:
        if app.rebalancing or not consuming():
            return
        consumer = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in (*consumed, settings.arm_facts_topic)]
        if app.consumer_generation_id != generation["id"]:
            generation["id"], generation["since"] = app.consumer_generation_id, time.monotonic()
            return
        if not tps or worker.busy:
            return
        # No broker round trips here: they go through Faust's consumer thread
        # and, seen in a two-worker rebalance, kept recovery from finishing.
        # The cached high-water marks of the fetches are enough.
        highwaters = {tp: consumer.highwater(tp) for tp in tps}
        # The first record not yet processed (see processed_upto). Seeking to 0
        # where the log starts later is safe: the reset policy is earliest.
        committed = {tp: processed_upto(tp) for tp in tps}
        stalls = find_stalls(
            committed,
            highwaters,
            idle_s=time.monotonic() - max(worker.last_activity, float(generation["since"] or 0)),
            idle_threshold_s=settings.stall_idle_s,
            busy=worker.busy,
            already_tried=tried,
        )
        for stall in stalls:
            log.warning(
                "records beyond the committed offset while idle; re-reading them",
                topic=stall.tp.topic,
                partition=stall.tp.partition,
                committed=stall.committed,
                highwater=stall.highwater,
            )
            tried[stall.tp] = (stall.committed, stall.highwater)
            metrics.stalls_recovered.labels(stall.tp.topic).inc()
            await consumer.seek(stall.tp, stall.committed)

    arm_states = app.Table(
        "arm-toxicity", default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes
    )

    @app.agent(app.topic(settings.arm_facts_topic, **_RAW), name="trialwatch.arms")
    async def arms_agent(stream: faust.StreamT[bytes]) -> None:
        await _drive(stream, worker.handle_arm_fact, arm_states)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def gauges() -> None:
        """Lag and open alerts, for the partitions this worker owns now."""
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
            lag = max(0, highwater - processed_upto(tp)) if highwater is not None else 0
            last = worker.last_timestamp.get((tp.topic, tp.partition))
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
            metrics.consumer_lag_seconds.labels(tp.topic, str(tp.partition)).set(
                max(0.0, now - last) if lag and last is not None else 0.0
            )

    def consuming() -> bool:
        return bool(app.consumer.assignment()) and not app.rebalancing and app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]

    # DSMB delivery: every worker keeps the alert books and serves the API;
    # the worker owning the lead partition runs the webhook notifier.
    async def publish(topic: str, key: bytes, value: bytes) -> None:
        await (await send(topic, key, value))

    notifier: Notifier | None = None

    def wake_notifier() -> None:
        if notifier is not None:
            notifier.wake.set()

    feed = DsmbFeed(settings.bootstrap_list, settings.ledger_topic, on_change=wake_notifier)
    api = DsmbApi(feed, publish, metrics, {Role.DSMB: settings.dsmb_token, Role.MASKED: settings.masked_token})
    dsmb_web.register(app, api)
    lead = TopicPartition(ENROLLMENT, 0)
    if settings.webhook_urls or settings.escalation_webhook_urls:
        assert settings.webhook_secret is not None  # enforced by Settings
        notifier = Notifier(
            feed,
            publish,
            metrics,
            ledger_topic=settings.ledger_topic,
            primary=[Receiver("primary", url) for url in settings.webhook_urls],
            escalation=[Receiver("escalation", url) for url in settings.escalation_webhook_urls],
            secret=settings.webhook_secret.get_secret_value().encode(),
            escalate_after_s=settings.escalate_after_s,
            timeout_s=settings.webhook_timeout_s,
            retry_initial_s=settings.webhook_retry_initial_s,
            retry_max_s=settings.webhook_retry_max_s,
            give_up_after_s=settings.webhook_give_up_after_s,
            is_leader=lambda: consuming() and lead in app.consumer.assignment(),
        )

    async def keep_running(name: str, run: Callable[[], Awaitable[None]]) -> None:
        # The feed and the notifier outlive any one Kafka error: restart them
        # (their state is rebuilt from the topics) rather than lose them silently.
        while not app.should_stop:
            try:
                await run()
            except Exception:
                log.error(f"{name} stopped on an error; restarting in 5 s", exc_info=True)
                await asyncio.sleep(5.0)

    @app.task  # type: ignore[untyped-decorator]
    async def dsmb_feed() -> None:
        await keep_running("alert feed", feed.run)

    if notifier is not None:
        running = notifier

        @app.task  # type: ignore[untyped-decorator]
        async def webhook_notifier() -> None:
            await keep_running("webhook notifier", running.run)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            ready = consuming()
            metrics.ready.set(1 if ready else 0)
            return self.json({"status": "ok", "consuming": ready})

    @app.page("/ready")
    class Ready(View):
        """Readiness: tables recovered and partitions assigned; 503 until then (and during rebalances)."""

        async def get(self, request: Request) -> Response:
            ready = consuming()
            metrics.ready.set(1 if ready else 0)
            return self.json({"ready": ready}, status=200 if ready else 503)

    @app.page("/live")
    class Live(View):
        """Liveness: the worker has not crashed or begun stopping (an agent error exits the process)."""

        async def get(self, request: Request) -> Response:
            alive = not app.should_stop and not app.crashed
            return self.json({"alive": alive}, status=200 if alive else 503)

    @app.page("/metrics")
    class PrometheusMetrics(View):
        async def get(self, request: Request) -> Response:
            metrics.ready.set(1 if consuming() else 0)
            # aiohttp wants the charset apart from the content type.
            return self.text(generate_latest(reg).decode(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app
