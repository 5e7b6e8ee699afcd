"""Topic set-up: the contract's topics with the partition counts and retention the design needs."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from trialwatch.contract import ALERT_ACKS, ALERTS, ALERTS_MASKED, DEADLETTER, INPUT_TOPICS
from trialwatch.settings import Settings

_WEEK_MS = str(7 * 24 * 3600 * 1000)
_YEAR_MS = str(365 * 24 * 3600 * 1000)

# Alert topics are compacted (the contract: the topic holds every alert's
# current state), but no record is compacted away for a week, so every
# consumer that is less than a week behind still sees every revision.
OUTPUT_CONFIGS: dict[str, dict[str, str]] = {
    ALERTS: {"cleanup.policy": "compact", "min.compaction.lag.ms": _WEEK_MS},
    ALERTS_MASKED: {"cleanup.policy": "compact", "min.compaction.lag.ms": _WEEK_MS},
    # Rejected input is evidence of what a site sent: keep it a year.
    DEADLETTER: {"cleanup.policy": "delete", "retention.ms": _YEAR_MS},
    # The audit trail of who acknowledged what, when: never deleted.
    ALERT_ACKS: {"cleanup.policy": "delete", "retention.ms": "-1"},
}


def topic_specs(settings: Settings) -> list[NewTopic]:
    rf = settings.replication_factor
    specs = [NewTopic(name, settings.partitions, rf) for name in INPUT_TOPICS]
    specs += [NewTopic(name, settings.partitions, rf, topic_configs=cfg) for name, cfg in OUTPUT_CONFIGS.items()]
    # Ticks are wake-up calls: the deadlines live in the subjects' state, so a
    # day of retention is plenty.
    specs.append(
        NewTopic(
            settings.ticks_topic,
            settings.partitions,
            rf,
            topic_configs={"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000)},
        )
    )
    # Facts are folded into the arm table (changelog-backed); a week covers
    # any outage the arm agent could be catching up from.
    specs.append(NewTopic(settings.arm_facts_topic, settings.partitions, rf, topic_configs={"retention.ms": _WEEK_MS}))
    # Webhook outcomes: only the latest per delivery id matters.
    specs.append(NewTopic(settings.ledger_topic, settings.partitions, rf, topic_configs={"cleanup.policy": "compact"}))
    return specs


async def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> list[str]:
    """Create any missing contract topic; check existing input topics share the partition count.

    Returns the names created. Raises when an input topic exists with another
    partition count: subjects would not meet their state, so refuse to run.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_list, request_timeout_ms=15000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(1.0)
    try:
        existing = set(await admin.list_topics())
        wanted = topic_specs(settings)
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            await admin.create_topics(missing)
        co_partitioned = (*INPUT_TOPICS, settings.ticks_topic)
        present = [t.name for t in wanted if t.name in existing and t.name in co_partitioned]
        if present:
            described = await admin.describe_topics(present)
            for info in described:
                count = len(info["partitions"])
                if count != settings.partitions:
                    raise RuntimeError(
                        f"topic {info['topic']} has {count} partitions, the service is configured "
                        f"for {settings.partitions}: all input topics must share the partition count"
                    )
        return [t.name for t in missing]
    finally:
        await admin.close()
