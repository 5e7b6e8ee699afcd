"""End-to-end fixtures: the real broker, `trialwatch worker` processes, producers and readers.

Every test gets its own consumer group (app id) and its own subject ids, so
tests share the contract's fixed topics without seeing each other's alerts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import RecordMetadata, TopicPartition

from trialwatch.alert_feed import reader
from trialwatch.dsmb.notify import DELIVERY_HEADER, KIND_HEADER, SIGNATURE_HEADER, verify
from trialwatch.kafka_admin import ensure_topics
from trialwatch.settings import Settings
from trialwatch.units import CANONICAL_UNIT

TRIALWATCH = str(Path(sys.executable).with_name("trialwatch"))


@pytest.fixture(scope="session")
def bootstrap() -> str:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not servers:
        if os.environ.get("TRIALWATCH_REQUIRE_KAFKA") == "1":
            pytest.fail("KAFKA_BOOTSTRAP_SERVERS is not set but TRIALWATCH_REQUIRE_KAFKA=1")
        pytest.skip("no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS or run `make test`")
    asyncio.run(ensure_topics(Settings(bootstrap_servers=servers)))
    return servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class WorkerProcess:
    """A `trialwatch worker` subprocess, as an operator would run it."""

    env: dict[str, str]
    log_path: Path
    port: int
    app_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        log = self.log_path.with_suffix(f".{len(self.logs)}.log")
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen([TRIALWATCH, "worker"], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                body = json.loads(self.get("/health"))
                if body.get("consuming"):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not consuming after {timeout_s}s:\n{log.read_text()[-3000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            body: bytes = resp.read()
            return body.decode()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def worker_factory(bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(app_id: str | None = None, **env: str) -> WorkerProcess:
        port = free_port()
        app_id = app_id or f"tw-e2e-{uuid.uuid4().hex[:10]}"
        full_env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "TRIALWATCH_APP_ID": app_id,
            "TRIALWATCH_WEB_PORT": str(port),
            "TRIALWATCH_DATA_DIR": str(tmp_path / f"data-{app_id}"),
            "TRIALWATCH_LOG_FORMAT": "json",
            # A killed worker's partitions are reassigned after this long.
            "TRIALWATCH_SESSION_TIMEOUT_S": "6",
            "TRIALWATCH_STALL_IDLE_S": "4",
            "TRIALWATCH_STALL_CHECK_INTERVAL_S": "1",
            **env,
        }
        worker = WorkerProcess(
            env=full_env, app_id=app_id, log_path=tmp_path / f"worker-{app_id}-{len(started)}", port=port
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop(signal.SIGKILL)


@pytest.fixture
def subject_prefix() -> str:
    """Pseudonymous subject codes unique to this test."""
    return f"E2E-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await prod.start()
    yield prod
    await prod.stop()


def _record(line: dict[str, Any]) -> tuple[str, bytes, bytes | None]:
    """(topic, value, key) of an event-file line: the value as JSON unless already bytes, keyed by subject_id."""
    value = line["value"]
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    key = line.get("key", value.get("subject_id") if isinstance(value, dict) else None)
    return line["topic"], raw, key.encode() if isinstance(key, str) else key


async def publish(producer: AIOKafkaProducer, lines: list[dict[str, Any]]) -> None:
    """Send event-file lines keyed by subject_id, in order."""
    for line in lines:
        topic, raw, key = _record(line)
        await producer.send_and_wait(topic, raw, key=key)


async def publish_batch(producer: AIOKafkaProducer, lines: list[dict[str, Any]]) -> list[RecordMetadata]:
    """As `publish`, without a round trip per record: all sent, then every acknowledgement awaited.

    The fixture's producer is idempotent, so each partition keeps the order of `lines`.
    """
    sent = []
    for line in lines:
        topic, raw, key = _record(line)
        sent.append(await producer.send(topic, raw, key=key))
    return list(await asyncio.gather(*sent))


async def forget(bootstrap: str, sent: list[RecordMetadata], topics: list[str]) -> None:
    """Delete the records `sent` but the last of each partition, with every record before them, and the `topics`.

    Every test's worker is a new consumer group that reads the input topics
    from the beginning: records a test publishes by the thousand would
    otherwise be processed again by the worker of every later test first.
    One record is kept: in a partition with none left, a new group commits
    nothing, which `wait_consumed` and the worker's stall watchdog would take
    for records not yet processed.
    """
    ends: dict[TopicPartition, int] = {}
    for meta in sent:
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(offset) for tp, offset in ends.items()})
        await admin.delete_topics(topics)
    finally:
        await admin.close()


async def wait_consumed(bootstrap: str, group: str, topic: str, timeout_s: float = 30.0) -> None:
    """Wait until consumer group `group` has committed every partition of `topic` to its end.

    Kafka orders records within a partition, not across topics: a test that
    needs one topic's events processed before another's waits for this.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            if all(committed.get(tp) is not None and committed[tp].offset >= ends[tp] for tp in tps if ends[tp] > 0):
                return
            await asyncio.sleep(0.3)
        raise TimeoutError(f"group {group} did not consume {topic} to its end within {timeout_s}s")
    finally:
        await consumer.stop()
        await admin.close()


async def read_topic(
    bootstrap: str,
    topic: str,
    keep: Callable[[dict[str, Any]], bool],
    until: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float = 30.0,
    settle_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Records of `topic` from the beginning that `keep` accepts, once `until` holds (then `settle_s` more)."""
    consumer = await reader(bootstrap, topic)
    found: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < (settle_until if settle_until is not None else deadline):
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for rec in records:
                    try:
                        value = json.loads(rec.value)
                    except ValueError:
                        continue  # input topics hold the deliberately broken records of other tests
                    if not isinstance(value, dict):
                        continue
                    if keep(value):
                        found.append(value)
            if settle_until is None and until(found):
                if settle_s <= 0:
                    return found
                settle_until = time.monotonic() + settle_s
        if settle_until is None:
            raise TimeoutError(f"condition on {topic} not met after {timeout_s}s; got {len(found)}: {found}")
        return found
    finally:
        await consumer.stop()


def lab(
    subject: str, event_id: str, value: float, *, at: str, analyte: str = "platelets", **extra: Any
) -> dict[str, Any]:
    unit = CANONICAL_UNIT[analyte]
    return {
        "topic": "trial.labs.v1",
        "value": {
            "event_id": event_id,
            "subject_id": subject,
            "site_id": "SITE-E2E",
            "occurred_at": at,
            "analyte": analyte,
            "value": value,
            "unit": unit,
            **extra,
        },
    }


def enrollment(subject: str, arm: str, *, at: str = "2025-03-01T08:00:00+08:00") -> dict[str, Any]:
    return {
        "topic": "trial.enrollment.v1",
        "value": {
            "event_id": f"{subject}-enr",
            "subject_id": subject,
            "site_id": "SITE-E2E",
            "occurred_at": at,
            "arm": arm,
            "first_line_regimen": "atezolizumab+bevacizumab",
            "age_years": 61,
            "kps": 90,
            "child_pugh_score": 6,
        },
    }


def second_line_start(subject: str, at: datetime) -> dict[str, Any]:
    return {
        "topic": "trial.treatment.v1",
        "value": {
            "event_id": f"{subject}-2L",
            "subject_id": subject,
            "site_id": "SITE-E2E",
            "occurred_at": at.isoformat(),
            "kind": "second_line_start",
            "regimen": "lenvatinib",
        },
    }


def adverse_event(subject: str, event_id: str, grade: int, serious: bool, *, at: str, **extra: Any) -> dict[str, Any]:
    return {
        "topic": "trial.adverse-events.v1",
        "value": {
            "event_id": event_id,
            "subject_id": subject,
            "site_id": "SITE-E2E",
            "occurred_at": at,
            "term": "Diarrhea",
            "grade": grade,
            "serious": serious,
            "attribution": "probable",
            **extra,
        },
    }


@dataclass
class Received:
    path: str
    kind: str
    delivery_id: str
    signed: bool
    alert: dict[str, Any]


class WebhookReceiver:
    """A local HTTP receiver that records every webhook and checks its signature; can be down (not listening)."""

    def __init__(self, secret: str, prefix: str) -> None:
        self.secret = secret.encode()
        self.prefix = prefix
        self.port = free_port()
        self.got: list[Received] = []
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        alert = json.loads(body)
        # The alerts topic is shared with other tests; keep only ours.
        if str(alert.get("subject_id", "")).startswith(self.prefix):
            self.got.append(
                Received(
                    path=request.path,
                    kind=request.headers[KIND_HEADER],
                    delivery_id=request.headers[DELIVERY_HEADER],
                    signed=verify(self.secret, body, request.headers.get(SIGNATURE_HEADER, "")),
                    alert=alert,
                )
            )
        return web.Response(status=204)

    async def wait_for(self, done: Callable[[list[Received]], bool], timeout_s: float = 40.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done(self.got):
                return self.got
            await asyncio.sleep(0.2)
        summary = [(r.path, r.kind, r.alert["subject_id"], r.alert["revision"], r.alert["status"]) for r in self.got]
        raise TimeoutError(f"receiver did not get what was expected within {timeout_s}s; got {summary}")


def call(url: str, token: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def api_until(url: str, token: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = call(url, token)
        if status == 200 and done(body):
            return body
        await asyncio.sleep(0.3)
    raise TimeoutError(f"{url} never satisfied the test; last answer {body}")
