"""The SBRT start window fires on the wall clock, durably: no further events, restarts in between."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from tests.e2e.conftest import enrollment, publish, read_topic, second_line_start

pytestmark = pytest.mark.e2e


def start_whose_window_closes_in(seconds: float) -> tuple[datetime, datetime]:
    """A second-line start whose 14-day window closes (local midnight) `seconds` to `seconds + 60` from now.

    Calendar days count in the start's own UTC offset, so choosing the offset
    moves the closing midnight anywhere in the next day, to the minute.
    """
    close_utc = datetime.now(UTC) + timedelta(seconds=seconds)
    close_utc = close_utc.replace(second=0, microsecond=0) + timedelta(minutes=1)
    minutes = close_utc.hour * 60 + close_utc.minute
    # Local midnight happens at close_utc when the offset is -minutes (mod a day).
    offset = -minutes if minutes <= 12 * 60 else 24 * 60 - minutes
    tz = timezone(timedelta(minutes=offset))
    close_local = close_utc.astimezone(tz)
    assert (close_local.hour, close_local.minute) == (0, 0)
    start = datetime.combine(close_local.date() - timedelta(days=15), datetime.min.time(), tz) + timedelta(hours=9)
    return start, close_local


def mine(subject: str) -> Any:
    return lambda v: v["subject_id"] == subject


class TestWindowAlreadyClosed:
    """A second-line start whose window closed long ago raises `sbrt.window.missed` at once."""

    async def test_missed_fires_within_seconds_with_no_further_events(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        worker_factory().start()
        s = f"{subject_prefix}-late"
        start = datetime(2025, 3, 1, 20, 0, tzinfo=timezone(timedelta(hours=8)))
        await publish(producer, [enrollment(s, "sbrt"), second_line_start(s, start)])

        alerts = await read_topic(
            bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 1, timeout_s=15, settle_s=3
        )

        assert [("sbrt.window.missed", "high", "firing", 1)] == [
            (a["rule"], a["severity"], a["status"], a["revision"]) for a in alerts
        ]
        assert "2025-03-16T00:00:00+08:00" == alerts[0]["occurred_at"]
        masked = await read_topic(bootstrap, "trial.alerts.masked.v1", mine(s), lambda f: True, timeout_s=3, settle_s=2)
        assert [] == masked


class TestWindowClosesOnTheWallClock:
    """With nothing more published, the timer fires the deadline at local midnight of day 15."""

    async def test_missed_fires_at_the_deadline_without_events(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        worker_factory().start()
        s = f"{subject_prefix}-clock"
        start, closes = start_whose_window_closes_in(15)
        await publish(producer, [enrollment(s, "sbrt"), second_line_start(s, start)])

        # The at-risk deadline (day 10) is long past: that warning comes at once.
        first = await read_topic(bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 1, timeout_s=15)
        assert [("sbrt.window.at_risk", "firing")] == [(a["rule"], a["status"]) for a in first]
        assert datetime.now(UTC) < closes

        wait = (closes - datetime.now(UTC)).total_seconds() + 20
        alerts = await read_topic(bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 3, timeout_s=wait)

        states = [(a["rule"], a["status"], a["revision"]) for a in alerts]
        assert [
            ("sbrt.window.at_risk", "firing", 1),
            ("sbrt.window.missed", "firing", 1),
            ("sbrt.window.at_risk", "resolved", 2),
        ] == states
        missed = alerts[1]
        raised = datetime.fromisoformat(missed["raised_at"])
        # Not before the deadline, and within a few timer intervals after it.
        assert closes <= raised < closes + timedelta(seconds=10)
        assert closes == datetime.fromisoformat(missed["occurred_at"])


class TestDeadlineSurvivesRestart:
    """A deadline that passes while no worker runs fires exactly once after the restart."""

    async def test_missed_fires_once_after_restart_past_the_deadline(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        worker = worker_factory()
        worker.start()
        s = f"{subject_prefix}-down"
        start, closes = start_whose_window_closes_in(20)  # room to see the first alert and stop first
        await publish(producer, [enrollment(s, "sbrt"), second_line_start(s, start)])
        await read_topic(bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 1, timeout_s=15)

        assert 0 == worker.stop(signal.SIGTERM)
        stopped = datetime.now(UTC)
        # Still ahead when the worker stopped, or the restart has nothing to prove.
        assert stopped < closes, "the deadline passed while the worker ran: nothing was pending at the stop"
        await asyncio.sleep(max(0.0, (closes - datetime.now(UTC)).total_seconds()) + 2)
        assert datetime.now(UTC) > closes
        worker.start()

        alerts = await read_topic(
            bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 3, timeout_s=30, settle_s=5
        )
        missed = [(a["status"], a["revision"]) for a in alerts if a["rule"] == "sbrt.window.missed"]
        assert [("firing", 1)] == missed
        [fired] = [a for a in alerts if a["rule"] == "sbrt.window.missed"]
        assert closes == datetime.fromisoformat(fired["occurred_at"])
        # Raised by the restarted worker: it was still pending when the first run stopped.
        assert stopped < datetime.fromisoformat(fired["raised_at"])


class TestDeadlineMovesWithItsPartition:
    """When the worker that owns a subject leaves, the deadline fires once on the worker that takes over."""

    async def test_missed_fires_once_on_the_surviving_worker(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        first = worker_factory()
        first.start()
        second = worker_factory(app_id=first.app_id)
        second.start()
        subjects = one_per_partition(f"{subject_prefix}-move")  # whatever the first worker owns holds one
        start, closes = start_whose_window_closes_in(50)
        await publish(
            producer, [line for s in subjects for line in (enrollment(s, "sbrt"), second_line_start(s, start))]
        )
        await read_topic(
            bootstrap,
            "trial.alerts.v1",
            lambda v: v["subject_id"] in subjects,
            lambda f: len({a["subject_id"] for a in f}) == len(subjects),
            timeout_s=45,  # two workers catch up on the topics' history and rebalance
        )

        # It owns partitions (so, with a subject on each, at least one subject) when it stops.
        await until_consuming(first)
        assert 0 == first.stop(signal.SIGTERM)  # its partitions move to the second worker
        stopped = datetime.now(UTC)
        assert stopped < closes, "the deadlines passed before the first worker stopped: nothing moved pending"
        wait = (closes - datetime.now(UTC)).total_seconds() + 45
        alerts = await read_topic(
            bootstrap,
            "trial.alerts.v1",
            lambda v: v["subject_id"] in subjects and v["rule"] == "sbrt.window.missed",
            lambda f: len(f) >= len(subjects),
            timeout_s=wait,
            settle_s=5,
        )

        assert sorted(subjects) == sorted(a["subject_id"] for a in alerts)
        assert all(closes == datetime.fromisoformat(a["occurred_at"]) for a in alerts)
        # Every one fired after the first worker had gone: none was settled before it stopped.
        assert all(stopped < datetime.fromisoformat(a["raised_at"]) for a in alerts)


async def until_consuming(worker: Any, timeout_s: float = 30.0) -> None:
    """Wait until the worker has partitions assigned and recovered (not mid-rebalance)."""
    deadline = time.monotonic() + timeout_s
    while not json.loads(worker.get("/health"))["consuming"]:
        assert time.monotonic() < deadline, "the worker owns no partitions"
        await asyncio.sleep(0.3)


def one_per_partition(prefix: str, partitions: int = 4) -> list[str]:
    """Subject codes keyed onto each partition of the input topics (the producer's murmur2 partitioner)."""
    found: dict[int, str] = {}
    for n in range(10_000):
        subject = f"{prefix}{n}"
        found.setdefault((murmur2(subject.encode()) & 0x7FFFFFFF) % partitions, subject)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise AssertionError("no subject code for some partition")
