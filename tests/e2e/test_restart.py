"""At-least-once across restarts: no alert lost, no second message for the same alert state."""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from tests.e2e.conftest import lab, publish, read_topic, wait_consumed

pytestmark = pytest.mark.e2e


def states(alerts: list[dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    return [(a["alert_id"], a["subject_id"], a["severity"], a["status"], a["revision"]) for a in alerts]


async def run_across_restart(
    stop_signal: int, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, prefix: str
) -> list[dict[str, Any]]:
    s1, s2 = f"{prefix}-1", f"{prefix}-2"
    worker = worker_factory()
    worker.start()
    await publish(producer, [lab(s1, f"{s1}-1", 40, at="2025-03-02T08:00:00+08:00")])
    await read_topic(bootstrap, "trial.alerts.v1", lambda v: v["subject_id"] == s1, lambda f: len(f) >= 1)

    worker.stop(stop_signal)
    # Published while no worker runs: must be picked up, on top of the recovered state.
    await publish(
        producer,
        [
            lab(s1, f"{s1}-2", 20, at="2025-03-03T08:00:00+08:00"),
            lab(s1, f"{s1}-3", 150, at="2025-03-04T08:00:00+08:00"),
            lab(s2, f"{s2}-1", 10, at="2025-03-04T08:00:00+08:00"),
        ],
    )
    worker.start()
    try:
        return await read_topic(
            bootstrap,
            "trial.alerts.v1",
            lambda v: str(v["subject_id"]).startswith(prefix),
            lambda f: len({(a["alert_id"], a["revision"]) for a in f}) >= 4,
            # Wait past a commit interval for any re-sent duplicate to show up.
            settle_s=4.0,
        )
    except TimeoutError as exc:
        metrics = "\n".join(m for m in worker.get("/metrics").splitlines() if m.startswith("trialwatch_events"))
        raise TimeoutError(f"{exc}\nworker metrics:\n{metrics}") from None


class TestGracefulRestart:
    """A stop and start resumes from the committed offsets and the recovered subject table."""

    async def test_restart_continues_alert_lifecycle_without_duplicates(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        alerts = await run_across_restart(signal.SIGTERM, bootstrap, worker_factory, producer, subject_prefix)

        got = states(alerts)
        s1, s2 = f"{subject_prefix}-1", f"{subject_prefix}-2"
        first_id = next(g[0] for g in got if g[1] == s1)
        # Same alert_id after the restart: the open episode was recovered from the changelog.
        assert [
            (first_id, s1, "high", "firing", 1),
            (first_id, s1, "critical", "firing", 2),
            (first_id, s1, "critical", "resolved", 3),
        ] == [g for g in got if g[1] == s1]
        assert [("critical", "firing", 1)] == [g[2:] for g in got if g[1] == s2]
        assert [] == [k for k, n in Counter((g[0], g[4]) for g in got).items() if n > 1]


class TestCrashRestart:
    """A SIGKILL loses no alert; a re-sent message can only repeat an identical alert state."""

    async def test_kill_and_restart_loses_nothing(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        alerts = await run_across_restart(signal.SIGKILL, bootstrap, worker_factory, producer, subject_prefix)

        got = states(alerts)
        s1 = f"{subject_prefix}-1"
        distinct = sorted(set(got), key=lambda g: (g[1], g[4]))
        assert [("high", "firing", 1), ("critical", "firing", 2), ("critical", "resolved", 3)] == [
            g[2:] for g in distinct if g[1] == s1
        ]
        assert 1 == len({g[0] for g in distinct if g[1] == s1})
        # At-least-once: a duplicate is allowed only as an exact repeat of one state.
        by_revision: dict[tuple[str, int], set[tuple[str, str]]] = {}
        for alert_id, _, severity, status, revision in got:
            by_revision.setdefault((alert_id, revision), set()).add((severity, status))
        assert all(1 == len(v) for v in by_revision.values())


async def committed_offsets(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    """(offsets the group has committed, records on the topic), summed over the topic's partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(tps)
        done = await admin.list_consumer_group_offsets(group, partitions=tps)
        return sum(max(0, done[tp].offset) if tp in done else 0 for tp in tps), sum(ends.values())
    finally:
        await consumer.stop()
        await admin.close()


class TestKillBetweenProducingAndCommitting:
    """Issue 12: alerts go out without waiting one by one, offsets are committed later; a kill in between
    loses no alert state and never shows one (alert_id, revision) with two different contents."""

    async def test_every_alert_state_survives_and_none_contradicts_another(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        s1, s2, s3 = (f"{subject_prefix}-{n}" for n in (1, 2, 3))
        lines = [
            lab(s1, f"{s1}-1", 40, at="2025-03-02T08:00:00+08:00"),
            lab(s2, f"{s2}-1", 10, at="2025-03-02T09:00:00+08:00"),
            lab(s1, f"{s1}-2", 20, at="2025-03-03T08:00:00+08:00"),
            lab(s3, f"{s3}-1", 45, at="2025-03-03T09:00:00+08:00"),
            lab(s1, f"{s1}-3", 150, at="2025-03-04T08:00:00+08:00"),
        ]
        ours = lambda v: str(v["subject_id"]).startswith(subject_prefix)  # noqa: E731
        # Offsets committed only every 10 minutes: the kill lands after the alerts, before the commit.
        worker = worker_factory(TRIALWATCH_COMMIT_INTERVAL_S="600")
        worker.start()
        await publish(producer, lines)
        await read_topic(
            bootstrap, "trial.alerts.v1", ours, lambda f: len({(a["alert_id"], a["revision"]) for a in f}) >= 5
        )
        committed, published = await committed_offsets(bootstrap, worker.app_id, "trial.labs.v1")
        assert committed < published, "the scenario needs input offsets not yet committed"

        worker.stop(signal.SIGKILL)
        restarted = worker_factory(app_id=worker.app_id)
        restarted.start()
        await wait_consumed(bootstrap, worker.app_id, "trial.labs.v1")
        alerts = await read_topic(bootstrap, "trial.alerts.v1", ours, lambda f: True, settle_s=4.0)

        assert [("high", "firing", 1), ("critical", "firing", 2), ("critical", "resolved", 3)] == sorted(
            {(a["severity"], a["status"], a["revision"]) for a in alerts if a["subject_id"] == s1}, key=lambda g: g[2]
        )
        assert {("critical", "firing", 1)} == {
            (a["severity"], a["status"], a["revision"]) for a in alerts if a["subject_id"] == s2
        }
        assert {("high", "firing", 1)} == {
            (a["severity"], a["status"], a["revision"]) for a in alerts if a["subject_id"] == s3
        }
        # A re-sent state may differ only in raised_at ("when the service produced this state").
        contents: dict[tuple[str, int], set[str]] = {}
        for alert in alerts:
            body = {k: v for k, v in alert.items() if k != "raised_at"}
            contents.setdefault((alert["alert_id"], alert["revision"]), set()).add(json.dumps(body, sort_keys=True))
        assert [] == [key for key, seen in contents.items() if len(seen) > 1]
        consumed = [
            m for m in restarted.get("/metrics").splitlines() if m.startswith("trialwatch_events_consumed_total")
        ]
        assert any('topic="trial.labs.v1"' in m and float(m.split()[-1]) >= 1 for m in consumed), (
            "the restarted worker re-read the uncommitted records"
        )
