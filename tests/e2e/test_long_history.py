"""A subject with 20,000 events: its state record stays small, is recovered after a restart and still alerts.

Issue 11 bounded the per-subject state. One subject gets an enrolment, a
second-line start, a grade-3 adverse event early on that stays open, normal
labs over six analytes every eight hours (18 years of them) with a few mild
adverse events, and last a grade-3 platelet count. Every changelog record of
the subject must stay under 64 kB. After a graceful restart, the alerts of
the recovered state must go on where they were: a platelet count of 20
escalates the same platelet alert (revision 2), the AE's update to grade 1
resolves the same AE alert (revision 2), and the re-sent last lab is
recognised. A state lost in the restart would raise new revision-1 alerts and
leave the AE update unanswered.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import RecordMetadata, TopicPartition

from tests.e2e.conftest import (
    WorkerProcess,
    adverse_event,
    enrollment,
    forget,
    lab,
    publish,
    publish_batch,
    read_topic,
    second_line_start,
    wait_consumed,
)
from trialwatch.contract import ADVERSE_EVENTS, ALERTS, ENROLLMENT, LABS, TREATMENT
from trialwatch.engine.state import SubjectState

pytestmark = pytest.mark.e2e

EVENTS = 20_000
STATE_LIMIT = 64 * 1024
START = datetime(2006, 6, 1, 8, 0, tzinfo=timezone(timedelta(hours=8)))
STEP = timedelta(hours=8)
# (analyte, a value in its reference range in the canonical unit): the labs, in turn.
NORMAL = [
    ("platelets", 180.0),
    ("neutrophils", 3.2),
    ("hemoglobin", 130.0),
    ("total_bilirubin", 12.0),
    ("alt", 30.0),
    ("creatinine", 70.0),
]
OPEN_AE_AT = 100  # position of the grade-3 AE among the follow-up events


def at(i: int) -> str:
    """Clinical time of the i-th follow-up event (i may run past the history)."""
    return (START + timedelta(days=2) + STEP * i).isoformat()


def follow_up(s: str, i: int) -> dict[str, Any]:
    """The i-th event after the second-line start: a normal lab, or every 1,000th a grade 1-2 AE."""
    if i == OPEN_AE_AT:
        return adverse_event(s, f"{s}-ae-{i}", 3, False, at=at(i), ae_id=f"{s}-AE-open", attribution="unrelated")
    if i % 1000 == 999:
        return adverse_event(s, f"{s}-ae-{i}", 1 + i // 1000 % 2, False, at=at(i), attribution="unlikely")
    analyte, normal = NORMAL[i % len(NORMAL)]
    wobble = 1.0 + ((i * 37) % 21 - 10) / 100
    return lab(s, f"{s}-lab-{i}", round(normal * wobble, 2), at=at(i), analyte=analyte)


def last_lab(s: str) -> dict[str, Any]:
    """The history's last event, a grade-3 platelet count: once processed, every lab before it is."""
    return lab(s, f"{s}-lab-last", 40, at=at(EVENTS - 3))


def history(s: str) -> list[dict[str, Any]]:
    """EVENTS events of one subject, in order."""
    lines = [enrollment(s, "control", at=START.isoformat()), second_line_start(s, START + timedelta(days=1))]
    lines += [follow_up(s, i) for i in range(EVENTS - 3)]
    return [*lines, last_lab(s)]


def after_restart(s: str) -> list[dict[str, Any]]:
    """The re-sent last lab (nothing new), a platelet count of 20 (grade 4), the open AE updated to grade 1."""
    later = at(EVENTS)
    return [
        last_lab(s),
        lab(s, f"{s}-lab-after", 20, at=later),
        adverse_event(s, f"{s}-ae-after", 1, False, at=later, ae_id=f"{s}-AE-open", attribution="unrelated"),
    ]


def mine(s: str) -> Callable[[dict[str, Any]], bool]:
    return lambda v: v["subject_id"] == s


def states(alerts: list[dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    return sorted((a["alert_id"], a["rule"], a["severity"], a["status"], a["revision"]) for a in alerts)


async def subject_records(bootstrap: str, topic: str, key: bytes) -> tuple[list[int], bytes]:
    """Sizes of every record of `key` in `topic`, from the beginning to the current end, and the last value."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        sizes, last = [], b""
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for rec in records:
                    if rec.key == key and rec.value is not None:
                        sizes.append(len(rec.value))
                        last = rec.value
        return sizes, last
    finally:
        await consumer.stop()


async def wait_all_consumed(bootstrap: str, group: str) -> None:
    for topic in (ENROLLMENT, TREATMENT, ADVERSE_EVENTS, LABS):
        await wait_consumed(bootstrap, group, topic, timeout_s=300)


@dataclass
class Bulk:
    """The test's worker and the records it published by the thousand: forgotten at teardown."""

    worker: WorkerProcess
    sent: list[RecordMetadata] = field(default_factory=list)


@pytest.fixture
async def bulk(bootstrap: str, worker_factory: Any) -> AsyncIterator[Bulk]:
    made = Bulk(worker_factory())
    yield made
    worker = made.worker
    if worker.proc is not None and worker.proc.poll() is None:
        worker.stop(signal.SIGKILL)  # before its changelog goes
    # The subject's changelog is hundreds of MB: one state record per event.
    await forget(bootstrap, made.sent, [f"{worker.app_id}-subjects-changelog"])


async def before_restart(bootstrap: str, bulk: Bulk, producer: AIOKafkaProducer, s: str) -> list[dict[str, Any]]:
    """The whole history published and processed; the alerts it raised (the open AE and the last lab)."""
    bulk.sent += await publish_batch(producer, history(s))
    alerts = await read_topic(bootstrap, ALERTS, mine(s), lambda f: len(f) >= 2, timeout_s=300)
    await wait_all_consumed(bootstrap, bulk.worker.app_id)
    return alerts


async def check_state_record(bootstrap: str, app_id: str, s: str) -> None:
    """Every state record of the subject is small, and the last one holds all EVENTS events."""
    sizes, last = await subject_records(bootstrap, f"{app_id}-subjects-changelog", s.encode())
    assert sizes, "no state record of the subject in the changelog"
    assert max(sizes) < STATE_LIMIT, f"largest state record {max(sizes):,} bytes (last {sizes[-1]:,})"
    assert last[:1] == b"\x01"  # format 1
    assert EVENTS == SubjectState.from_bytes(last).seq  # every event applied and saved


class TestLongHistory:
    """Issue 11: a subject with 20,000 events is saved, recovered after a restart and still alerts correctly."""

    async def test_state_stays_small_and_is_recovered_after_a_restart(
        self, bootstrap: str, bulk: Bulk, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        s = f"{subject_prefix}-long"
        worker = bulk.worker
        worker.start()
        first = await before_restart(bootstrap, bulk, producer, s)
        await check_state_record(bootstrap, worker.app_id, s)

        assert 0 == worker.stop()
        worker.start(timeout_s=300)
        await publish(producer, after_restart(s))
        # Past a commit interval: a duplicate or a re-raised alert would show up.
        alerts = await read_topic(bootstrap, ALERTS, mine(s), lambda f: len(f) >= 4, timeout_s=120, settle_s=5.0)

        ids = {a["rule"]: a["alert_id"] for a in first}
        lab_id, ae_id = ids.get("lab.platelets.low"), ids.get("ae.grade3plus")
        assert states(first) == sorted(
            [(lab_id, "lab.platelets.low", "high", "firing", 1), (ae_id, "ae.grade3plus", "high", "firing", 1)]
        )
        assert states(alerts) == sorted(
            [
                *states(first),
                (lab_id, "lab.platelets.low", "critical", "firing", 2),
                (ae_id, "ae.grade3plus", "high", "resolved", 2),
            ]
        )
