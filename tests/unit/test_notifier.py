"""The webhook notifier against a real local HTTP server (no Kafka): retries, giving up, leadership, the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from tests.unit.test_dsmb import FakePublisher, ack, alert, raw
from trialwatch.contract import ALERTS
from trialwatch.dsmb import service
from trialwatch.dsmb.book import Delivery
from trialwatch.dsmb.notify import DELIVERY_HEADER, KIND_HEADER, SIGNATURE_HEADER, Job, Receiver, verify
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


class ObservedNotifier(Notifier):
    """The real notifier, counting its dispatch passes and the delivery attempts it starts and finishes.

    Absence ("nothing more was sent") is asserted only once the notifier has
    looked again: a whole pass after the event, with no attempt in flight.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = 0
        self.started: list[str] = []
        self.finished = 0

    def _dispatch(self, session: Any) -> None:
        super()._dispatch(session)
        self.passes += 1

    async def _attempt(self, session: Any, job: Job) -> None:
        self.started.append(job.kind)
        try:
            await super()._attempt(session, job)
        finally:
            self.finished += 1

    def idle(self) -> bool:
        return self.finished == len(self.started)


def then_a_quiet_pass(notifier: ObservedNotifier, event: Callable[[], bool]) -> Callable[[], bool]:
    """A condition for `run_until`: `event` happened, then the notifier made two more passes and is idle.

    Two: the pass running when `event` was first seen may have begun before it.
    """
    seen_at: list[int] = []

    def done() -> bool:
        if not seen_at:
            if not event():
                return False
            seen_at.append(notifier.passes)
        return notifier.passes >= seen_at[0] + 2 and notifier.idle()

    return done


def notifier_for(feed: DsmbFeed, url: str, publisher: FakePublisher, **overrides: Any) -> ObservedNotifier:
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
    return ObservedNotifier(feed, publisher, Metrics(CollectorRegistry()), **options)


@contextlib.asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[None]:
    task = asyncio.create_task(notifier.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(notifier: Notifier, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for `done`, waking the running notifier every 50 ms so that it makes passes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not done():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the notifier did not get there in time")
        notifier.wake.set()
        await asyncio.sleep(0.05)


async def run_until(notifier: Notifier, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with running(notifier):
        await until(notifier, done, timeout_s)


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
        # Nothing more may be sent once delivered: judged after the notifier looked again.
        await run_until(notifier, then_a_quiet_pass(notifier, lambda: bool(ledger(publisher))))
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
        await run_until(notifier, then_a_quiet_pass(notifier, lambda: bool(ledger(publisher))))
        [record] = ledger(publisher)
        assert "gave_up" == record.outcome
        assert 1.0 == counted(notifier, "gave_up")
        assert record.attempts == len(hook.requests), "a given-up delivery is not tried again"

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
        asked: list[bool] = []

        def not_leading() -> bool:
            asked.append(False)
            return False

        notifier = notifier_for(feed, f"http://127.0.0.1:{hook.port}/hook", publisher, is_leader=not_leading)
        # It has asked three times whether it leads; each time it must have stopped there.
        await run_until(notifier, lambda: len(asked) >= 3)
        assert (0, 0, [], []) == (notifier.passes, feed.syncs, notifier.started, hook.requests)

    async def test_a_busy_notifier_stops_when_cancelled(self) -> None:
        """Woken without pause (deliveries finishing one after another), it must still stop on shutdown."""
        notifier = notifier_for(LoadedFeed(), "http://127.0.0.1:9/hook", FakePublisher(), is_leader=lambda: False)

        async def keep_waking() -> None:
            while True:
                notifier.wake.set()
                await asyncio.sleep(0)

        waker = asyncio.create_task(keep_waking())
        task = asyncio.create_task(notifier.run())
        try:
            await asyncio.sleep(0.2)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            assert {task} == done, "the notifier ignored its cancellation"
        finally:
            waker.cancel()
            task.cancel()
            await asyncio.wait({waker, task}, timeout=1.0)

    async def test_on_taking_the_lead_it_reads_the_ledger_first_and_skips_what_was_delivered(
        self, hook_server: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The previous leader's ledger record is still being fetched when the successor takes the lead.

        The successor's feed is the real DsmbFeed over a consumer that lags
        (one record per fetch): only `sync` makes it read the record in time.
        """
        hook = await hook_server([204])
        url = f"http://127.0.0.1:{hook.port}/hook"
        first_feed, first_ledger = LoadedFeed(), FakePublisher()
        first_feed.dsmb.add_alert(raw(alert(1)))
        first = notifier_for(first_feed, url, first_ledger)
        await run_until(first, lambda: bool(ledger(first_ledger)))
        assert 1 == len(hook.requests)

        broker = FakeBroker()
        broker.append(ALERTS, raw(alert(1)))
        monkeypatch.setattr(service, "AIOKafkaConsumer", broker.consumer)
        successor_feed = DsmbFeed(["unused:9092"], "ledger")
        feed_task = asyncio.create_task(successor_feed.run())
        try:
            await asyncio.wait_for(successor_feed.caught_up.wait(), 5)
            # Written by the previous leader as it handed over: behind other records, not read yet.
            for n in range(30):
                broker.append("ledger", delivered_elsewhere(f"other-{n}").model_dump_json().encode())
            for _, _, value in first_ledger.sent:
                broker.append("ledger", value)
            successor = notifier_for(successor_feed, url, FakePublisher())
            await run_until(successor, then_a_quiet_pass(successor, lambda: successor.passes >= 1))
        finally:
            feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed_task
        assert ([], 1) == (successor.started, len(hook.requests))


def delivered_elsewhere(alert_id: str) -> Delivery:
    """A ledger record of some other alert (read before the alert itself: kept aside, harmless)."""
    return Delivery(
        delivery_id=f"d-{alert_id}",
        alert_id=alert_id,
        revision=1,
        kind="alert",
        receiver="r",
        outcome="delivered",
        attempts=1,
        at=datetime.now(UTC),
    )


@dataclass
class _Record:
    value: bytes


class FakeBroker:
    """Topics of one partition each as lists of values, and consumers of them for DsmbFeed.run.

    A consumer returns one record per fetch, 20 ms apart: it lags behind the
    end of a topic the way a real one does behind a busy topic.
    """

    def __init__(self) -> None:
        self.log: dict[TopicPartition, list[bytes]] = defaultdict(list)

    def append(self, topic: str, value: bytes) -> None:
        self.log[TopicPartition(topic, 0)].append(value)

    def consumer(self, **_: Any) -> Any:
        return _FakeConsumer(self.log)


class _FakeConsumer:
    def __init__(self, log: dict[TopicPartition, list[bytes]]) -> None:
        self.log = log
        self.positions: dict[TopicPartition, int] = {}
        self._client = self

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def fetch_all_metadata(self) -> Any:
        return self

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(tps, 0)

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.log[tp]) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[_Record]]:
        await asyncio.sleep(0.02)
        for tp, at in self.positions.items():
            if at < len(self.log[tp]):
                self.positions[tp] = at + 1
                return {tp: [_Record(self.log[tp][at])]}
        return {}


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
        # Every attempt waits for a slot the test holds: the alert and its escalation queue up.
        notifier._slots = asyncio.Semaphore(0)
        async with running(notifier):
            await until(notifier, lambda: ["alert", "escalation"] == sorted(notifier.started))
            feed.dsmb.add_ack(ack("alert-1", 1))
            notifier._slots.release()
            # Both queued attempts have had their slot (the alert is delivered), and a pass followed.
            await until(notifier, then_a_quiet_pass(notifier, lambda: bool(ledger(publisher))))
        kinds = [h.get(KIND_HEADER) for _, h in hook.requests]
        assert ["alert"] == kinds, "an escalation acknowledged while it waited must not go out"
