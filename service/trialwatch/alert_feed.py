"""`trialwatch alerts`: follow an alert topic and print each new alert state for a person."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from trialwatch.contract import AlertMessage, MaskedAlertMessage
from trialwatch.settings import Settings

_MARK = {"critical": "!!!", "high": "!! ", "warning": "!  ", "info": "i  "}


def render(alert: AlertMessage | MaskedAlertMessage) -> str:
    """One line per alert state: severity, status, rule, subject, then the summary."""
    arm = getattr(alert, "arm", None)
    where = f"{alert.subject_id}@{alert.site_id}" + (f" [{arm}]" if arm else "")
    status = "FIRING  " if alert.status == "firing" else "resolved"
    return (
        f"{_MARK[alert.severity]} {alert.severity.upper():<8} {status} {alert.rule:<22} "
        f"{where:<24} r{alert.revision}  {alert.summary}"
    )


async def reader(bootstrap: list[str] | str, topic: str) -> AIOKafkaConsumer:
    """A started consumer of every partition of `topic` from its beginning.

    No consumer group: a reader must never move the service's offsets, and a
    group join racing the first fetches was seen to drop a record in tests.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        # aiokafka has no public "partitions of a topic, fetched now" call for
        # an unsubscribed consumer; the client's metadata fetch is what
        # `topics()` uses inside. Version pinned in pyproject.toml.
        metadata = await consumer._client.fetch_all_metadata()
        partitions = metadata.partitions_for_topic(topic)
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist; run `trialwatch topics`")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def follow_alerts(
    settings: Settings, topic: str, *, as_json: bool = False, idle_exit_s: float | None = None
) -> int:
    """Print alerts from the start of the topic, each (alert_id, revision) once; returns how many."""
    model: Any = MaskedAlertMessage if topic.endswith("masked.v1") else AlertMessage
    consumer = await reader(settings.bootstrap_list, topic)
    seen: set[tuple[str, int]] = set()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000 if idle_exit_s is None else int(idle_exit_s * 1000))
            if not batch and idle_exit_s is not None:
                return len(seen)
            for records in batch.values():
                for rec in records:
                    try:
                        alert = model.model_validate_json(rec.value or b"")
                    except ValidationError:
                        print(f"(unreadable alert record at offset {rec.offset})", file=sys.stderr)
                        continue
                    # At-least-once: a crash between producing an alert and
                    # saving state re-sends the same revision; show it once.
                    if (alert.alert_id, alert.revision) in seen:
                        continue
                    seen.add((alert.alert_id, alert.revision))
                    print(rec.value.decode() if as_json and rec.value else render(alert), flush=True)
    except asyncio.CancelledError:
        return len(seen)
    finally:
        await consumer.stop()
