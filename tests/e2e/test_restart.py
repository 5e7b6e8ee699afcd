"""At-least-once across restarts: no alert lost, no second message for the same alert state."""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.conftest import lab, publish, read_topic

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
