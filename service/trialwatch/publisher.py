"""Publishing events: validate against the contract first, then send with `subject_id` as the key.

For hospital code::

    async with Publisher("kafka:9092") as publisher:
        await publisher.publish("trial.labs.v1", {...})      # raises InvalidEvent, sends nothing

    with SyncPublisher("kafka:9092") as publisher:           # for code without an event loop
        publisher.publish("trial.labs.v1", {...})
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from trialwatch.contract import TOPIC_BY_MODEL
from trialwatch.decode import Rejection, decode
from trialwatch.event_file import BadLine, read_event_file
from trialwatch.settings import Settings

T = TypeVar("T")


class InvalidEvent(ValueError):
    """The event breaks the v1 contract; it was not sent. `reason` is a dead-letter reason."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason}: {rejection.detail}")
        self.reason = rejection.reason
        self.detail = rejection.detail
        self.errors = rejection.errors


def _bytes(value: Mapping[str, Any] | BaseModel | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_unset=True).encode()
    return json.dumps(value).encode()


class Publisher:
    """Async publisher: validates each event as the service will, then sends it keyed by `subject_id`.

    The producer is idempotent with acks from all replicas: a retried send does
    not duplicate, and `publish` returns only once Kafka has the event.
    """

    def __init__(self, bootstrap_servers: str | list[str]) -> None:
        servers = bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
        self._producer = AIOKafkaProducer(bootstrap_servers=servers, enable_idempotence=True, acks="all", linger_ms=5)

    async def __aenter__(self) -> Publisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(self, topic: str, value: Mapping[str, Any] | BaseModel | bytes) -> None:
        payload = _bytes(value)
        event = decode(topic, payload)
        if isinstance(event, Rejection):
            raise InvalidEvent(event)
        await self._producer.send_and_wait(topic, payload, key=event.subject_id.encode())

    async def send_unchecked(self, topic: str, key: bytes, payload: bytes) -> asyncio.Future[Any]:
        """Queue an already validated payload; await the returned future for Kafka's acknowledgement."""
        future: asyncio.Future[Any] = await self._producer.send(topic, payload, key=key)
        return future


class SyncPublisher:
    """The same for code without an event loop: a private loop on a background thread."""

    def __init__(self, bootstrap_servers: str | list[str], timeout_s: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trialwatch-publisher", daemon=True)
        self._timeout_s = timeout_s
        self._bootstrap = bootstrap_servers
        self._publisher: Publisher | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout_s)

    def __enter__(self) -> SyncPublisher:
        self._thread.start()

        async def start() -> Publisher:
            return await Publisher(self._bootstrap).__aenter__()

        self._publisher = self._run(start())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._publisher is not None:
            self._run(self._publisher.__aexit__())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout_s)

    def publish(self, topic: str, value: Mapping[str, Any] | BaseModel | bytes) -> None:
        assert self._publisher is not None, "use SyncPublisher as a context manager"
        self._run(self._publisher.publish(topic, value))


@dataclass
class PublishReport:
    sent: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)


async def publish_file(settings: Settings, lines: Iterable[str]) -> PublishReport:
    """Send every valid line; report each invalid one with its line number and reason, unsent."""
    report = PublishReport()
    async with Publisher(settings.bootstrap_list) as publisher:
        futures = []
        for line_no, item in read_event_file(lines):
            if isinstance(item, BadLine):
                report.rejected.append((line_no, item.reason, item.detail))
                continue
            payload = item.model_dump_json(exclude_unset=True).encode()
            futures.append(
                await publisher.send_unchecked(TOPIC_BY_MODEL[type(item)], item.subject_id.encode(), payload)
            )
        for future in futures:
            await future
            report.sent += 1
    return report
