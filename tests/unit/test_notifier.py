"""The webhook notifier against a real local HTTP server (no Kafka): retries, giving up, leadership, the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.unit.test_dsmb import FakePublisher, ack, alert, raw
from trialwatch.dsmb.book import Delivery
from trialwatch.dsmb.notify import DELIVERY_HEADER, SIGNATURE_HEADER, Receiver, verify
from trialwatch.dsmb.service import DsmbFeed, Notifier
from trialwatch.metrics import Metrics

SECRET = b"unit-secret"


class LoadedFeed(DsmbFeed):
    """A feed whose books the test fills; nothing further to read from Kafka."""

    def __init__(self) -> None:
        super().__init__(["unused:9092"], "ledger")
        self.caught_up.set()
        self.syncs = 0

    async def sync(self) -> None:
        self.syncs += 1


class Hook:
    """A local receiver answering with the status codes it is given, in turn (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((await request.read(), dict(request.headers)))
        status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        return web.Response(status=status)


@pytest.fixture
async def hook_server() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(statuses: list[int]) -> Hook:
        hook = Hook(statuses)
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", hook.port).start()
        runners.append(runner)
        return hook

    yield start
    for runner in runners:
        await runner.cleanup()


def notifier_for(feed: DsmbFeed, url: str, publisher: FakePublisher, **overrides: Any) -> Notifier:
    options: dict[str, Any] = {
        "ledger_topic": "ledger",
        "primary": [Receiver("primary", url)],
        "escalation": [],
        "secret": SECRET,
        "escalate_after_s": 3600.0,
        "timeout_s": 2.0,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.2,
        "give_up_after_s": 60.0,
        "is_leader": lambda: True,
    }
    options.update(overrides)
    return Notifier(feed, publisher, Metrics(CollectorRegistry()), **options)


async def run_until(notifier: Notifier, done: Any, timeout_s: float = 10.0) -> None:
    task = asyncio.create_task(notifier.run())
    try:
        for _ in range(int(timeout_s / 0.05)):
            if done():
                return
            notifier.wake.set()
            await asyncio.sleep(0.05)
        raise AssertionError("the notifier did not get there in time")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ledger(publisher: FakePublisher) -> list[Delivery]:
    return [Delivery.model_validate_json(value) for topic, _, value in publisher.sent if topic == "ledger"]


def counted(notifier: Notifier, outcome: str) -> float:
    value = notifier.metrics.registry.get_sample_value(
        "trialwatch_webhook_deliveries_total", {"receiver_group": "primary", "kind": "alert", "outcome": outcome}
    )
    return value or 0.0


class TestRetries:
    async def test_refused_deliveries_are_retried_until_accepted_then_recorded_once(self, hook_server: Any) -> None:
        hook = await hook_server([503, 500, 204])
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        notifier = notifier_for(feed, f"http://127.0.0.1:{hook.port}/hook", publisher)
        await run_until(notifier, lambda: ledger(publisher))
        await asyncio.sleep(0.3)  # nothing more may be sent once delivered
        assert 3 == len(hook.requests)
        assert {h[DELIVERY_HEADER] for _, h in hook.requests} == {d.delivery_id for d in ledger(publisher)}
        assert all(verify(SECRET, body, h[SIGNATURE_HEADER]) for body, h in hook.requests)
        [record] = ledger(publisher)
        assert ("delivered", 3) == (record.outcome, record.attempts)
        assert (2.0, 1.0) == (counted(notifier, "failed"), counted(notifier, "delivered"))

    async def test_a_receiver_refusing_past_the_window_is_given_up_and_counted(self, hook_server: Any) -> None:
        hook = await hook_server([500])
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        notifier = notifier_for(feed, f"http://127.0.0.1:{hook.port}/hook", publisher, give_up_after_s=0.3)
        await run_until(notifier, lambda: ledger(publisher))
        [record] = ledger(publisher)
        assert "gave_up" == record.outcome
        assert 1.0 == counted(notifier, "gave_up")
        attempts = len(hook.requests)
        await asyncio.sleep(0.3)
        assert attempts == len(hook.requests), "a given-up delivery is not tried again"

    async def test_next_revision_waits_for_the_first(self, hook_server: Any) -> None:
        hook = await hook_server([503, 204])
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        feed.dsmb.add_alert(raw(alert(2, status="resolved")))
        notifier = notifier_for(feed, f"http://127.0.0.1:{hook.port}/hook", publisher)
        await run_until(notifier, lambda: len(ledger(publisher)) == 2)
        revisions = [alert_revision(body) for body, _ in hook.requests]
        assert [1, 1, 2] == revisions

    async def test_unreachable_receiver_is_a_failure_not_a_crash(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        notifier = notifier_for(feed, f"http://127.0.0.1:{closed_port}/hook", publisher)
        await run_until(notifier, lambda: counted(notifier, "failed") >= 2)
        assert [] == ledger(publisher)


class TestLeadership:
    async def test_a_worker_that_does_not_lead_sends_nothing(self, hook_server: Any) -> None:
        hook = await hook_server([204])
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        notifier = notifier_for(feed, f"http://127.0.0.1:{hook.port}/hook", publisher, is_leader=lambda: False)
        with pytest.raises(AssertionError, match="did not get there"):
            await run_until(notifier, lambda: hook.requests, timeout_s=0.5)
        assert 0 == feed.syncs

    async def test_on_taking_the_lead_it_reads_the_ledger_first_and_skips_what_was_delivered(
        self, hook_server: Any
    ) -> None:
        hook = await hook_server([204])
        feed, publisher = LoadedFeed(), FakePublisher()
        feed.dsmb.add_alert(raw(alert(1)))
        url = f"http://127.0.0.1:{hook.port}/hook"
        first = notifier_for(feed, url, publisher)
        await run_until(first, lambda: ledger(publisher))
        # Another worker takes over with the ledger as its book holds it.
        successor_feed = LoadedFeed()
        successor_feed.dsmb.add_alert(raw(alert(1)))
        for record in ledger(publisher):
            successor_feed.dsmb.add_delivery(record)
        successor = notifier_for(successor_feed, url, FakePublisher())
        await run_until(successor, lambda: successor_feed.syncs == 1)
        await asyncio.sleep(0.3)
        assert 1 == len(hook.requests)


def alert_revision(body: bytes) -> int:
    revision: int = json.loads(body)["revision"]
    return revision


class TestRedirects:
    async def test_a_redirect_is_a_failed_attempt_not_a_delivery(self) -> None:
        """Followed, a 302 turns the POST into a bodiless GET answered 200: the alert would be lost as 'delivered'."""
        seen: list[str] = []

        async def moved(request: web.Request) -> web.Response:
            seen.append(request.method)
            return web.Response(status=302, headers={"Location": "/elsewhere"})

        async def elsewhere(request: web.Request) -> web.Response:
            seen.append(f"{request.method} /elsewhere")
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", moved)
        app.router.add_route("*", "/elsewhere", elsewhere)
        runner = web.AppRunner(app)
        await runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            feed, publisher = LoadedFeed(), FakePublisher()
            feed.dsmb.add_alert(raw(alert(1)))
            notifier = notifier_for(feed, f"http://127.0.0.1:{port}/hook", publisher)
            await run_until(notifier, lambda: counted(notifier, "failed") >= 2)
            assert [] == ledger(publisher)
            assert [] == [m for m in seen if "elsewhere" in m]
        finally:
            await runner.cleanup()


class TestStillOwed:
    async def test_an_escalation_acknowledged_while_queued_is_not_sent(self, hook_server: Any) -> None:
        hook = await hook_server([204])
        feed, publisher = LoadedFeed(), FakePublisher()
        critical = alert(1, severity="critical")
        feed.dsmb.add_alert(raw(critical))
        url = f"http://127.0.0.1:{hook.port}/hook"
        notifier = notifier_for(feed, url, publisher, escalate_after_s=0.0001, is_leader=lambda: True)
        # Queue everything behind a slot held by the test, then acknowledge.
        notifier._slots = asyncio.Semaphore(0)
        task = asyncio.create_task(notifier.run())
        await asyncio.sleep(0.3)
        feed.dsmb.add_ack(ack("alert-1", 1))
        notifier._slots.release()
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        kinds = [h.get("X-Trialwatch-Notification") for _, h in hook.requests]
        assert "escalation" not in kinds
