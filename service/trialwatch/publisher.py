"""Publishing events: validate against the contract first, then send with `subject_id` as the key."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from trialwatch.contract import TOPIC_BY_MODEL
from trialwatch.replay import BadLine, read_event_file
from trialwatch.settings import Settings


@dataclass
class PublishReport:
    sent: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)


async def publish_file(settings: Settings, lines: Iterable[str]) -> PublishReport:
    """Send every valid line; report each invalid one with its line number and reason, unsent."""
    report = PublishReport()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_list,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
    )
    await producer.start()
    try:
        futures = []
        for line_no, item in read_event_file(lines):
            if isinstance(item, BadLine):
                report.rejected.append((line_no, item.reason, item.detail))
                continue
            futures.append(
                await producer.send(
                    TOPIC_BY_MODEL[type(item)],
                    key=item.subject_id.encode(),
                    value=item.model_dump_json(exclude_unset=True).encode(),
                )
            )
        for fut in futures:
            await fut
            report.sent += 1
    finally:
        await producer.stop()
    return report
