"""The Faust application: one agent over the five input topics, a changelog-backed subjects table."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import structlog
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from trialwatch.contract import ENROLLMENT, INPUT_TOPICS
from trialwatch.dsmb import web as dsmb_web
from trialwatch.dsmb.api import DsmbApi, Role
from trialwatch.dsmb.notify import Receiver
from trialwatch.dsmb.service import DsmbFeed, Notifier
from trialwatch.engine import Engine
from trialwatch.engine.state import decode_header
from trialwatch.faust_fixes import hold_commits_at_unacknowledged_records
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
from trialwatch.runtime import RAW, Runtime, drive, drive_batches
from trialwatch.settings import Settings
from trialwatch.worker import SubjectWorker

log = structlog.get_logger("trialwatch.app")


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
    inputs = app.topic(*consumed, **RAW)
    outputs: dict[str, faust.TopicT] = {}

    async def send(topic: str, key: bytes, value: bytes) -> Any:
        channel = outputs.get(topic)
        if channel is None:
            channel = outputs[topic] = app.topic(topic, **RAW)
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

    runtime = Runtime(app, worker, metrics, settings)

    @app.agent(inputs, name="trialwatch.subjects")
    async def subjects_agent(stream: faust.StreamT[bytes]) -> None:
        await drive_batches(stream, settings, worker.handle_batch, subjects, runtime.reread_skipped)

    @app.timer(interval=settings.tick_interval_s)  # type: ignore[untyped-decorator]
    async def deadline_ticker() -> None:
        await runtime.tick()

    @app.timer(interval=settings.stall_check_interval_s)  # type: ignore[untyped-decorator]
    async def stall_watchdog() -> None:
        await runtime.check_stalls()

    arm_states = app.Table(
        "arm-toxicity", default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes
    )

    @app.agent(app.topic(settings.arm_facts_topic, **RAW), name="trialwatch.arms")
    async def arms_agent(stream: faust.StreamT[bytes]) -> None:
        await drive(stream, worker.handle_arm_fact, arm_states)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def gauges() -> None:
        runtime.update_gauges(feed)

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
            is_leader=lambda: runtime.consuming() and lead in app.consumer.assignment(),
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

    runtime.register_pages(reg)
    return app
