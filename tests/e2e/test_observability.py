"""What operations see: metric families while events flow, the dashboard's queries, and no patient data."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import WebhookReceiver, adverse_event, api_until, call, enrollment, lab, publish, read_topic

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "trialwatch.json"


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(scrape: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in scrape.get(name, []))


@pytest.fixture
async def traffic(
    bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
) -> AsyncIterator[tuple[Any, list[str], str]]:
    """A worker that has processed valid and invalid events, alerts and a pending deadline, sent webhooks and
    recorded an acknowledgement."""
    receiver = WebhookReceiver("obs-secret", subject_prefix)
    await receiver.start()
    token = secrets.token_hex(32)
    worker = worker_factory(
        TRIALWATCH_WEBHOOK_URLS=receiver.url("/hook"),
        TRIALWATCH_WEBHOOK_SECRET="obs-secret",
        TRIALWATCH_DSMB_TOKEN=token,
    )
    worker.start()
    s1, s2 = f"{subject_prefix}-o1", f"{subject_prefix}-o2"
    soon = datetime.now(UTC).astimezone() + timedelta(days=1)
    await publish(producer, [enrollment(s1, "sbrt"), enrollment(s2, "control")])
    await publish(
        producer,
        [
            lab(s1, f"{s1}-l1", 20, at="2025-03-02T08:00:00+08:00"),
            adverse_event(s2, f"{s2}-ae", 4, True, at="2025-03-03T08:00:00+08:00"),
            {"topic": "trial.labs.v1", "key": s1, "value": b"{broken"},
            {
                "topic": "trial.treatment.v1",
                "value": {
                    "event_id": f"{s1}-2L",
                    "subject_id": s1,
                    "site_id": "SITE-E2E",
                    "occurred_at": soon.isoformat(),
                    "kind": "second_line_start",
                    "regimen": "lenvatinib",
                },
            },
        ],
    )
    await read_topic(
        bootstrap, "trial.alerts.v1", lambda v: v["subject_id"] in (s1, s2), lambda f: len(f) >= 3, timeout_s=20
    )
    await receiver.wait_for(lambda got: len(got) >= 3)
    listed = await api_until(f"{worker.url}/alerts?subject_id={s2}", token, lambda b: b["count"] >= 1)
    first = listed["alerts"][0]
    ack = {"revision": first["revision"], "acknowledged_by": "Dr Obs"}
    assert 201 == call(f"{worker.url}/alerts/{first['alert_id']}/ack", token, ack)[0]
    await asyncio.sleep(6)  # one pass of the 5 s gauge timer
    yield worker, [s1, s2], subject_prefix
    await receiver.stop()


class TestMetrics:
    """Every metric family operations rely on is exposed, with values where traffic was sent."""

    async def test_metric_families_present_while_events_flow(self, traffic: tuple[Any, list[str], str]) -> None:
        worker, _, _ = traffic
        scrape = samples(worker.get("/metrics"))

        nonzero = [
            "trialwatch_events_consumed_total",
            "trialwatch_events_rejected_total",
            "trialwatch_alerts_produced_total",
            "trialwatch_event_processing_duration_seconds_count",
            "trialwatch_event_to_alert_latency_seconds_count",
            "trialwatch_open_alerts",
            "trialwatch_pending_deadlines",
            "trialwatch_site_last_event_timestamp_seconds",
            "trialwatch_worker_ready",
            "trialwatch_webhook_deliveries_total",
            "trialwatch_webhook_delivery_duration_seconds_count",
            "trialwatch_unacknowledged_alerts",
            "trialwatch_oldest_unacknowledged_alert_age_seconds",
            "trialwatch_alert_acks_recorded_total",
            "trialwatch_api_requests_total",
        ]
        present = [
            "trialwatch_consumer_lag_messages",
            "trialwatch_consumer_lag_seconds",
            "trialwatch_build_info",
            "trialwatch_webhook_pending_deliveries",
        ]
        assert [] == [name for name in nonzero if total(scrape, name) <= 0]
        assert [] == [name for name in present if name not in scrape]
        lag_topics = {labels["topic"] for labels, _ in scrape["trialwatch_consumer_lag_messages"]}
        assert {"trial.labs.v1", "trial.treatment.v1"} <= lag_topics
        # Counters end in _total and durations are in seconds: no Faust millisecond sensor.
        assert [] == [name for name in scrape if name.startswith("trialwatch_") and "_ms" in name]

    async def test_every_dashboard_query_uses_only_exposed_metrics(self, traffic: tuple[Any, list[str], str]) -> None:
        worker, _, _ = traffic
        exposed = set(samples(worker.get("/metrics")))
        dashboard = json.loads(DASHBOARD.read_text())
        queried = {
            name
            for panel in dashboard["panels"]
            for target in panel["targets"]
            for name in re.findall(r"\btrialwatch_[a-z0-9_]+", target["expr"])
        }
        assert queried, "the dashboard queries no trialwatch metric"
        assert [] == sorted(queried - exposed)


class TestNoPatientData:
    """Logs and metrics of a run carry no subject code and no arm."""

    async def test_logs_and_metrics_name_no_subject_and_no_arm(self, traffic: tuple[Any, list[str], str]) -> None:
        worker, subjects, prefix = traffic
        metrics_text = worker.get("/metrics")
        logs = worker.log_text()
        assert "alert produced" in logs  # the log was captured and has event lines

        for where, text in (("metrics", metrics_text), ("logs", logs)):
            assert prefix not in text, f"a subject code appears in the {where}"
            assert not re.search(r'\barm["=:\s]+"?(sbrt|control)', text), f"an arm appears in the {where}"
        for subject in subjects:
            assert subject not in logs
