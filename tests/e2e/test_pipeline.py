"""The live worker on a real broker: alerts out, rejects dead-lettered, the worker keeps going."""

from __future__ import annotations

import json
import urllib.error
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.conftest import adverse_event, enrollment, lab, publish, read_topic, wait_consumed

pytestmark = pytest.mark.e2e


def mine(prefix: str) -> Any:
    return lambda v: str(v.get("subject_id", "")).startswith(prefix)


class TestAlertsAndDeadLetters:
    """Valid events raise the expected alerts; each kind of invalid record is dead-lettered; processing goes on."""

    async def test_alerts_and_dead_letters_through_the_broker(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        worker = worker_factory()
        worker.start()
        s1, s2 = f"{subject_prefix}-1", f"{subject_prefix}-2"
        valid = lab(s1, f"{s1}-l1", 40, at="2025-03-02T08:00:00+08:00")
        bad: list[dict[str, Any]] = [
            {"topic": "trial.labs.v1", "key": s1, "value": b"{not json"},
            {"topic": "trial.labs.v1", "key": s1, "value": b'["an", "array"]'},
            {**lab(s1, f"{s1}-naive", 10, at="2025-03-02T08:00:00"), "key": s1},
            lab(s1, f"{s1}-unit", 10, at="2025-03-02T08:00:00+08:00", unit="g/L"),
            {**lab(s1, f"{s1}-key", 10, at="2025-03-02T08:00:00+08:00"), "key": "SOMEONE-ELSE"},
            {**enrollment(s2, "sbrt"), "value": {**enrollment(s2, "sbrt")["value"], "arm": "placebo"}},
        ]
        after = [
            enrollment(s2, "control"),
            lab(s2, f"{s2}-b1", 200, at="2025-03-04T08:00:00+08:00", analyte="total_bilirubin", ref_high=20),
        ]
        # Enrolment precedes labs clinically; Kafka orders only within a topic,
        # so let the worker consume it before the labs arrive.
        await publish(producer, [enrollment(s1, "sbrt")])
        await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")
        await publish(
            producer,
            [
                valid,
                lab(s1, f"{s1}-l2", 20, at="2025-03-03T08:00:00+08:00"),
                *bad,
                lab(s1, f"{s1}-l3", 150, at="2025-03-05T08:00:00+08:00"),
                *after,
            ],
        )

        alerts = await read_topic(bootstrap, "trial.alerts.v1", mine(subject_prefix), lambda f: len(f) >= 4)
        got = [(a["subject_id"], a["rule"], a["severity"], a["status"], a["revision"]) for a in alerts]
        assert [
            (s1, "lab.platelets.low", "high", "firing", 1),
            (s1, "lab.platelets.low", "critical", "firing", 2),
            (s1, "lab.platelets.low", "critical", "resolved", 3),
        ] == [g for g in got if g[0] == s1]
        # The event after all the rejects was still processed.
        assert [(s2, "lab.bilirubin.high", "high", "firing", 1)] == [g for g in got if g[0] == s2]
        assert {"sbrt"} == {a["arm"] for a in alerts if a["subject_id"] == s1}

        letters = await read_topic(
            bootstrap,
            "trial.deadletter.v1",
            lambda v: v["payload"].find(subject_prefix) >= 0 or v.get("key") == s1,
            lambda f: len(f) >= len(bad),
        )
        reasons = sorted(d["reason"] for d in letters)
        assert (
            sorted(
                ["not_json", "not_an_object", "naive_datetime", "unit_mismatch", "key_mismatch", "unknown_enum_value"]
            )
            == reasons
        )
        for letter in letters:
            assert letter["topic"] in {"trial.labs.v1", "trial.enrollment.v1"}
            assert letter["offset"] >= 0
            assert letter["detail"]
        unit_letter = next(d for d in letters if d["reason"] == "unit_mismatch")
        assert f"{s1}-unit" == json.loads(unit_letter["payload"])["event_id"]
        assert "unit" in unit_letter["detail"]

        metrics = worker.get("/metrics")
        assert 'trialwatch_events_rejected_total{reason="not_json",topic="trial.labs.v1"}' in metrics

    async def test_masked_stream_carries_the_same_alerts_without_arm(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        worker = worker_factory()
        worker.start()
        s = f"{subject_prefix}-m"
        await publish(producer, [enrollment(s, "sbrt")])
        await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")
        await publish(producer, [adverse_event(s, f"{s}-ae", 3, True, at="2025-03-05T10:00:00+08:00")])
        dsmb = await read_topic(bootstrap, "trial.alerts.v1", mine(s), lambda f: len(f) >= 2)
        masked = await read_topic(bootstrap, "trial.alerts.masked.v1", mine(s), lambda f: len(f) >= 2)
        assert sorted(a["alert_id"] for a in dsmb) == sorted(a["alert_id"] for a in masked)
        assert {"ae.grade3plus", "ae.serious"} == {a["rule"] for a in masked}
        assert all("arm" not in a for a in masked)
        assert {"sbrt"} == {a["arm"] for a in dsmb}


class TestWebSurface:
    """Only /health and /metrics are served: Faust's table and router pages are off."""

    def test_only_health_and_metrics_are_served(self, worker_factory: Any) -> None:
        worker = worker_factory()
        worker.start()
        assert {"status": "ok", "consuming": True} == json.loads(worker.get("/health"))
        assert {"ready": True} == json.loads(worker.get("/ready"))
        assert {"alive": True} == json.loads(worker.get("/live"))
        assert "trialwatch_build_info" in worker.get("/metrics")
        codes = {}
        for path in ["/table/", "/table/subjects/", "/router/", "/graph/", "/stats/", "/performance/"]:
            with pytest.raises(urllib.error.HTTPError) as err:
                worker.get(path)
            codes[path] = err.value.code
        assert dict.fromkeys(codes, 404) == codes
