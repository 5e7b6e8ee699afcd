"""DSMB delivery on the real broker: signed webhooks, escalation, acknowledgement, the API, a receiver that is down."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.conftest import (
    Received,
    WebhookReceiver,
    api_until,
    call,
    enrollment,
    lab,
    publish,
    read_topic,
    wait_consumed,
)

pytestmark = pytest.mark.e2e

SECRET = "e2e-webhook-secret"


def key(r: Received) -> tuple[str, str, str, int, str]:
    return (r.path, r.kind, r.alert["subject_id"], r.alert["revision"], r.alert["status"])


class TestWebhooksEscalationAndAcks:
    """Firing and resolution reach the receiver signed; an unacknowledged critical alert escalates, an acked one not."""

    async def test_signed_webhooks_escalation_and_acknowledgement(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        receiver = WebhookReceiver(SECRET, subject_prefix)
        await receiver.start()
        dsmb, masked = secrets.token_hex(32), secrets.token_hex(32)
        worker = worker_factory(
            TRIALWATCH_WEBHOOK_URLS=receiver.url("/primary"),
            TRIALWATCH_ESCALATION_WEBHOOK_URLS=receiver.url("/escalation"),
            TRIALWATCH_WEBHOOK_SECRET=SECRET,
            TRIALWATCH_ESCALATE_AFTER_S="12",
            TRIALWATCH_DSMB_TOKEN=dsmb,
            TRIALWATCH_MASKED_TOKEN=masked,
        )
        worker.start()
        try:
            critical, resolved, acked = (f"{subject_prefix}-{n}" for n in ("crit", "res", "ack"))
            await publish(producer, [enrollment(s, "sbrt") for s in (critical, resolved, acked)])
            await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")
            await publish(
                producer,
                [
                    lab(critical, f"{critical}-l1", 20, at="2025-03-02T08:00:00+08:00"),
                    lab(resolved, f"{resolved}-l1", 40, at="2025-03-02T08:00:00+08:00"),
                    lab(resolved, f"{resolved}-l2", 150, at="2025-03-03T08:00:00+08:00"),
                    lab(acked, f"{acked}-l1", 20, at="2025-03-02T08:00:00+08:00"),
                ],
            )

            # Acknowledge one critical alert through the API as soon as it is listed.
            listed = await api_until(
                f"{worker.url}/alerts?subject_id={acked}", dsmb, lambda b: b["count"] == 1, timeout_s=30
            )
            acked_id, acked_revision = listed["alerts"][0]["alert_id"], listed["alerts"][0]["revision"]
            status, body = call(
                f"{worker.url}/alerts/{acked_id}/ack", dsmb, {"revision": acked_revision, "acknowledged_by": "Dr E2E"}
            )
            assert (201, acked_id) == (status, body["acknowledgement"]["alert_id"])
            again, _ = call(
                f"{worker.url}/alerts/{acked_id}/ack", dsmb, {"revision": acked_revision, "acknowledged_by": "Dr Other"}
            )
            assert 200 == again

            got = await receiver.wait_for(
                lambda g: (
                    {(critical, "escalation"), (acked, "alert")} <= {(r.alert["subject_id"], r.kind) for r in g}
                    and sum(1 for r in g if r.alert["subject_id"] == resolved) >= 2
                ),
                timeout_s=60,
            )
            # Let a wrongly escalated acked alert, or a duplicate, show itself.
            await asyncio.sleep(4)
            got = receiver.got
            assert all(r.signed for r in got), "every body must carry a valid HMAC-SHA256 signature"
            assert [("/primary", "alert", resolved, 1, "firing"), ("/primary", "alert", resolved, 2, "resolved")] == [
                key(r) for r in got if r.alert["subject_id"] == resolved
            ]
            assert sorted(
                [
                    ("/primary", "alert", critical, 1, "firing"),
                    ("/primary", "escalation", critical, 1, "firing"),
                    ("/escalation", "escalation", critical, 1, "firing"),
                ]
            ) == sorted(key(r) for r in got if r.alert["subject_id"] == critical)
            assert [("/primary", "alert", acked, 1, "firing")] == [
                key(r) for r in got if r.alert["subject_id"] == acked
            ], "an acknowledged critical alert must not escalate"
            assert all(r.alert["arm"] == "sbrt" for r in got), "the DSMB receivers get the unblinded message"

            # The acknowledgement is in Kafka, the audit trail.
            acks = await read_topic(
                bootstrap, "trial.alert-acks.v1", lambda v: v["alert_id"] == acked_id, lambda f: len(f) >= 1
            )
            assert [("Dr E2E", 1)] == [(a["acknowledged_by"], a["revision"]) for a in acks]

            detail = call(f"{worker.url}/alerts/{acked_id}", dsmb)[1]
            assert "Dr E2E" == detail["alert"]["acknowledgement"]["acknowledged_by"]
            assert {"delivered"} == {d["outcome"] for d in detail["deliveries"]}

            # Escalation waited for the configured time after the critical state was raised.
            crit_detail = (await api_until(f"{worker.url}/alerts?subject_id={critical}", dsmb, lambda b: True))[
                "alerts"
            ][0]
            crit_full = call(f"{worker.url}/alerts/{crit_detail['alert_id']}", dsmb)[1]
            escalations = [d for d in crit_full["deliveries"] if d["kind"] == "escalation"]
            assert 2 == len(escalations)
            raised = crit_full["alert"]["raised_at"]
            for d in escalations:
                waited = _seconds_between(raised, d["at"])
                assert waited >= 12, f"escalated after {waited:.1f}s, before the configured 12 s"

            await self._api_access(worker.url, dsmb, masked, critical, subject_prefix)
        finally:
            await receiver.stop()

    async def _api_access(self, url: str, dsmb: str, masked: str, critical: str, prefix: str) -> None:
        assert 401 == call(f"{url}/alerts")[0]
        assert 401 == call(f"{url}/alerts", "not-a-token")[0]
        assert 403 == call(f"{url}/alerts", masked)[0]
        assert 404 == call(f"{url}/alerts/no-such-alert", dsmb)[0]
        assert 404 == call(f"{url}/alerts/no-such-alert/ack", dsmb, {"revision": 1, "acknowledged_by": "x"})[0]
        mine = call(f"{url}/alerts?subject_id={critical}&severity=critical", dsmb)[1]
        assert [(critical, "lab.platelets.low")] == [(a["subject_id"], a["rule"]) for a in mine["alerts"]]
        status, view = call(f"{url}/masked/alerts", masked)
        assert 200 == status
        ours = [a for a in view["alerts"] if a["subject_id"].startswith(prefix)]
        assert len(ours) >= 3
        assert '"arm"' not in json.dumps(view)


def _seconds_between(earlier: str, later: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


class TestReceiverDown:
    """A receiver that is down gets the alert once it is back, across a worker restart, exactly once."""

    async def test_delivered_after_outage_and_restart_once(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        receiver = WebhookReceiver(SECRET, subject_prefix)  # not started: the receiver is down
        env = {
            "TRIALWATCH_WEBHOOK_URLS": receiver.url("/primary"),
            "TRIALWATCH_WEBHOOK_SECRET": SECRET,
            "TRIALWATCH_WEBHOOK_RETRY_INITIAL_S": "0.5",
            "TRIALWATCH_WEBHOOK_RETRY_MAX_S": "2",
        }
        first = worker_factory(**env)
        first.start()
        subject = f"{subject_prefix}-down"
        await publish(producer, [enrollment(subject, "sbrt")])
        await wait_consumed(bootstrap, first.app_id, "trial.enrollment.v1")
        await publish(producer, [lab(subject, f"{subject}-l1", 20, at="2025-03-02T08:00:00+08:00")])

        # Delivery never holds up alert processing: the alert is on the stream
        # while the receiver refuses connections.
        started = time.monotonic()
        alerts = await read_topic(
            bootstrap, "trial.alerts.v1", lambda v: v.get("subject_id") == subject, lambda f: len(f) >= 1
        )
        assert time.monotonic() - started < 15
        alert_id = alerts[0]["alert_id"]

        deadline = time.monotonic() + 30
        while "webhook delivery failed; will retry" not in first.log_text():
            assert time.monotonic() < deadline, "the notifier never tried the receiver"
            await asyncio.sleep(0.3)
        failed = _metric(first.get("/metrics"), 'trialwatch_webhook_deliveries_total{kind="alert",outcome="failed"')
        assert failed >= 1
        assert 0 == first.stop()

        await receiver.start()
        try:
            second = worker_factory(app_id=first.app_id, **env)
            second.start()
            got = await receiver.wait_for(lambda g: any(r.alert["alert_id"] == alert_id for r in g), timeout_s=60)
            assert all(r.signed for r in got)
            assert 0 == second.stop()

            # A third start must find the delivery in the ledger and not send it again. The witness
            # is the alert's next state: a receiver gets revision 2 only once revision 1 counts as
            # delivered, so a third worker blind to the ledger would re-send 1 before it.
            third = worker_factory(app_id=first.app_id, **env)
            third.start()
            await publish(producer, [lab(subject, f"{subject}-l2", 150, at="2025-03-03T08:00:00+08:00")])
            await receiver.wait_for(lambda g: any(r.alert["revision"] == 2 for r in g), timeout_s=60)
            assert [(alert_id, 1, "firing"), (alert_id, 2, "resolved")] == [
                (r.alert["alert_id"], r.alert["revision"], r.alert["status"]) for r in receiver.got if r.kind == "alert"
            ]
            assert 0 == third.stop()
        finally:
            await receiver.stop()


class TestApiConnections:
    """The worker's web server as a slow or unauthorised client meets it (issue 10, defect 10)."""

    async def test_no_body_is_awaited_without_a_token_and_partial_headers_are_dropped(
        self, worker_factory: Any
    ) -> None:
        from trialwatch.dsmb.web import READ_TIMEOUT_S

        worker = worker_factory(TRIALWATCH_DSMB_TOKEN=secrets.token_hex(32))
        worker.start()
        # A POST announcing 1 MiB, without a token, sending no body: answered at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.port)
        writer.write(b"POST /alerts/x/ack HTTP/1.1\r\nHost: t\r\nContent-Length: 1048575\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert b"401" == status_line.split()[1]

        # A partial request line is not held: closed, unanswered, within the read timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.port)
        started = time.monotonic()
        writer.write(b"GET /alerts HTT")
        assert b"" == await asyncio.wait_for(reader.read(), READ_TIMEOUT_S + 10)
        writer.close()
        assert time.monotonic() - started < READ_TIMEOUT_S + 3
        assert 0 == worker.stop()


def _metric(text: str, prefix: str) -> float:
    """Sum of the samples whose line starts with `prefix` (labels in Prometheus' sorted order)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total
