"""The worker shell around the engine, with a fake producer and a dict for the subjects table."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from trialwatch.contract import ALERTS, ALERTS_MASKED, DEADLETTER, ENROLLMENT, LABS, TREATMENT
from trialwatch.engine import Engine, Tick
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
from trialwatch.worker import Record, SubjectWorker, tick_payload


class FakeProducer:
    """Records what was sent; fails the first `fail_first` sends the way Kafka would (a failed future)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail_first = fail_first
        self.attempts = 0

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[Any]:
        self.attempts += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.attempts <= self.fail_first:
            fut.set_exception(ConnectionError("broker unavailable"))
        else:
            self.sent.append((topic, key, value))
            fut.set_result(None)
        return fut

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(v) for t, _, v in self.sent if t == topic]


def lab(event_id: str, value: float, subject: str = "S-1", **extra: Any) -> bytes:
    body = {
        "event_id": event_id,
        "subject_id": subject,
        "site_id": "SITE-A",
        "occurred_at": "2025-03-01T08:00:00+08:00",
        "analyte": "platelets",
        "value": value,
        "unit": "10*9/L",
        **extra,
    }
    return json.dumps(body).encode()


def make_worker(producer: FakeProducer) -> tuple[SubjectWorker, CollectorRegistry]:
    registry = CollectorRegistry()
    worker = SubjectWorker(
        Engine(load_protocol()), Metrics(registry), producer.send, retry_initial_s=0.001, retry_max_s=0.002
    )
    return worker, registry


def record(value: bytes, key: bytes | None = b"S-1", offset: int = 0) -> Record:
    return Record(topic=LABS, partition=2, offset=offset, key=key, value=value, timestamp_s=None)


class TestDeadLetters:
    """Bad input becomes a dead-letter record with its coordinates, and nothing else."""

    @pytest.mark.parametrize(
        ("value", "key", "reason"),
        [
            (b"{not json", b"S-1", "not_json"),
            (b"[1, 2]", b"S-1", "not_an_object"),
            (lab("e1", 40).replace(b"+08:00", b""), b"S-1", "naive_datetime"),
            (lab("e1", 40, unit="g/L"), b"S-1", "unit_mismatch"),
            (lab("e1", 40), b"S-2", "key_mismatch"),
            (lab("e1", 40), None, "key_mismatch"),
        ],
        ids=["not-json", "array", "naive", "unit", "other-key", "no-key"],
    )
    async def test_rejected_record_is_dead_lettered_with_reason_and_origin(
        self, value: bytes, key: bytes | None, reason: str
    ) -> None:
        producer = FakeProducer()
        worker, registry = make_worker(producer)
        states: dict[bytes, bytes] = {}

        await worker.handle(record(value, key=key, offset=41), states)

        [letter] = producer.on(DEADLETTER)
        assert (reason, LABS, 2, 41) == (letter["reason"], letter["topic"], letter["partition"], letter["offset"])
        assert value.decode() == letter["payload"]
        assert [] == producer.on(ALERTS)
        assert {} == states
        assert 1.0 == registry.get_sample_value("trialwatch_events_rejected_total", {"topic": LABS, "reason": reason})

    async def test_valid_event_after_a_rejection_still_alerts(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)
        states: dict[bytes, bytes] = {}

        await worker.handle(record(b"\xff\xfe garbage", offset=1), states)
        await worker.handle(record(lab("e2", 40), offset=2), states)

        assert ["not_json"] == [d["reason"] for d in producer.on(DEADLETTER)]
        assert ["lab.platelets.low"] == [a["rule"] for a in producer.on(ALERTS)]

    async def test_non_utf8_payload_is_kept_as_base64(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)

        await worker.handle(record(b"\xff\xfe", offset=1), {})

        assert "base64://4=" == producer.on(DEADLETTER)[0]["payload"]


class TestAlertPublishing:
    """Alerts go to both streams, the masked one without the arm, before the state is saved."""

    async def test_alert_reaches_dsmb_and_masked_streams_keyed_by_alert_id(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)

        await worker.handle(record(lab("e1", 20)), {})

        [dsmb] = producer.on(ALERTS)
        [masked] = producer.on(ALERTS_MASKED)
        assert dsmb["alert_id"].encode() == producer.sent[0][1]
        assert "arm" in dsmb
        assert "arm" not in masked
        assert dsmb["alert_id"] == masked["alert_id"]

    async def test_failed_send_is_retried_and_state_written_only_after_delivery(self) -> None:
        producer = FakeProducer(fail_first=3)
        worker, registry = make_worker(producer)
        states: dict[bytes, bytes] = {}

        await worker.handle(record(lab("e1", 20)), states)

        assert 1 == len(producer.on(ALERTS))
        assert b"S-1" in states
        assert registry.get_sample_value("trialwatch_send_retries_total", {"topic": ALERTS}) >= 1

    async def test_state_is_not_written_while_kafka_refuses_the_alert(self) -> None:
        producer = FakeProducer(fail_first=10_000)
        worker, _ = make_worker(producer)
        states: dict[bytes, bytes] = {}

        task = asyncio.create_task(worker.handle(record(lab("e1", 20)), states))
        await asyncio.sleep(0.05)

        assert not task.done()
        assert {} == states
        task.cancel()

    async def test_resent_event_id_produces_nothing_the_second_time(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)
        states: dict[bytes, bytes] = {}

        await worker.handle(record(lab("e1", 20), offset=1), states)
        await worker.handle(record(lab("e1", 20), offset=2), states)

        assert 1 == len(producer.on(ALERTS))


class TestEngineFailure:
    """A bug in a rule dead-letters the event instead of killing the worker."""

    async def test_engine_exception_is_dead_lettered_as_processing_error(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)

        def broken(*_: Any) -> Any:
            raise ZeroDivisionError("boom")

        worker.engine.apply = broken  # type: ignore[method-assign]
        await worker.handle(record(lab("e1", 20)), {})

        [letter] = producer.on(DEADLETTER)
        assert ("processing_error", "e1") == (letter["reason"], letter["event_id"])


class HalfwayFailingEngine(Engine):
    """Fails once, after the real engine has already updated the state in place (a bug mid-rule)."""

    def __init__(self) -> None:
        super().__init__(load_protocol())
        self.fail_next = False

    def apply(self, state: Any, event: Any, now: Any) -> Any:
        result = super().apply(state, event, now)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a rule failed after the state was updated")
        return result


class TestParsedStateCache:
    """Reusing parsed states must never let a half-applied event count as processed."""

    async def test_an_event_whose_processing_failed_is_not_remembered_as_seen(self) -> None:
        producer = FakeProducer()
        engine = HalfwayFailingEngine()
        worker = SubjectWorker(engine, Metrics(CollectorRegistry()), producer.send)
        states: dict[bytes, bytes] = {}
        await worker.handle(record(lab("e1", 160), offset=0), states)
        engine.fail_next = True
        await worker.handle(record(lab("e2", 20), offset=1), states)
        assert [] == producer.on(ALERTS)
        assert ["processing_error"] == [d["reason"] for d in producer.on(DEADLETTER)]
        # The same event, re-sent after the bug is fixed, is evaluated: the
        # half-updated state (which had e2 as seen) was not kept.
        await worker.handle(record(lab("e2", 20), offset=2), states)
        assert [("lab.platelets.low", "critical")] == [(a["rule"], a["severity"]) for a in producer.on(ALERTS)]

    async def test_a_state_changed_behind_the_cache_is_read_from_the_table(self) -> None:
        """After a recovery the table holds other bytes than the worker last wrote: those win."""
        producer = FakeProducer()
        worker, _ = make_worker(producer)
        states: dict[bytes, bytes] = {}
        other, _ = make_worker(FakeProducer())
        other_states: dict[bytes, bytes] = {}
        await worker.handle(record(lab("e1", 160), offset=0), states)
        await other.handle(record(lab("e1", 160), offset=0), other_states)
        await other.handle(record(lab("e2", 40), offset=1), other_states)
        states[b"S-1"] = other_states[b"S-1"]  # as recovered from the changelog
        await worker.handle(record(lab("e2", 40), offset=1), states)
        assert [] == producer.on(ALERTS), "e2 is in the recovered state: a re-send, not a new result"


TICKS = "trialwatch-ticks"
ARM_FACTS = "trialwatch-arm-facts"


def policy_worker(producer: FakeProducer, engine: Engine | None = None) -> tuple[SubjectWorker, CollectorRegistry]:
    registry = CollectorRegistry()
    worker = SubjectWorker(
        engine or Engine(load_protocol()),
        Metrics(registry),
        producer.send,
        ticks_topic=TICKS,
        arm_facts_topic=ARM_FACTS,
        retry_initial_s=0.001,
        retry_max_s=0.002,
    )
    return worker, registry


class TickFailingEngine(Engine):
    def __init__(self) -> None:
        super().__init__(load_protocol())

    def apply(self, state: Any, event: Any, now: Any) -> Any:
        if isinstance(event, Tick):
            raise ArithmeticError("a deadline rule failed")
        return super().apply(state, event, now)


class TestOneErrorPolicyForEveryInputKind:
    """Issue 10, defect 3: an internal error on a tick or an arm fact exited the process (exit 70 and a
    crash loop on the same record); on an event it was dead-lettered. Now all three are dead-lettered."""

    async def test_a_tick_the_engine_fails_on_is_dead_lettered_and_the_worker_goes_on(self) -> None:
        producer = FakeProducer()
        worker, registry = policy_worker(producer, TickFailingEngine())
        states: dict[bytes, bytes] = {}
        await worker.handle(record(lab("e1", 160)), states)
        saved = states[b"S-1"]
        worker.deadlines.update(2, b"S-1", datetime(2025, 3, 2, tzinfo=UTC))

        tick = Record(TICKS, 2, 7, b"S-1", tick_payload("S-1", datetime(2025, 3, 2, tzinfo=UTC)))
        await worker.handle(tick, states)
        await worker.handle(record(lab("e2", 20), offset=1), states)

        [letter] = producer.on(DEADLETTER)
        assert ("processing_error", TICKS, 7) == (letter["reason"], letter["topic"], letter["offset"])
        assert ["lab.platelets.low"] == [a["rule"] for a in producer.on(ALERTS)], "the worker went on"
        assert saved != states[b"S-1"]
        assert 1.0 == registry.get_sample_value(
            "trialwatch_events_rejected_total", {"topic": TICKS, "reason": "processing_error"}
        )
        assert [] == worker.deadlines.due({2}, datetime(2030, 1, 1, tzinfo=UTC)), "no tick storm on a failing rule"

    @pytest.mark.parametrize(
        "value",
        [
            b"{not json",
            b'{"subject_id": "S-1"}',
            b'{"subject_id": "S-1", "arm": "placebo", "counted": true, "event_id": "e"}',
            b'{"subject_id": "S-1", "arm": "sbrt", "counted": "yes", "event_id": "e"}',
            b"[" * 100_000,
        ],
        ids=["not-json", "missing-fields", "unknown-arm", "counted-not-bool", "deep-nesting"],
    )
    async def test_a_corrupt_arm_fact_is_dead_lettered_and_the_next_one_counts(self, value: bytes) -> None:
        producer = FakeProducer()
        worker, _ = policy_worker(producer)
        arms: dict[bytes, bytes] = {}

        await worker.handle_arm_fact(Record(ARM_FACTS, 0, 3, b"sbrt", value), arms)
        good = json.dumps({"subject_id": "S-1", "arm": "sbrt", "counted": True, "event_id": "e1"}).encode()
        await worker.handle_arm_fact(Record(ARM_FACTS, 0, 4, b"sbrt", good), arms)

        assert [("processing_error", 3)] == [(d["reason"], d["offset"]) for d in producer.on(DEADLETTER)]
        assert b"sbrt" in arms
        assert 5 == worker.next_offset[(ARM_FACTS, 0)]

    async def test_the_error_is_logged_without_its_message(self, capsys: pytest.CaptureFixture[str]) -> None:
        # An exception's message may quote a value (a subject code in a KeyError): only its type and place.
        producer = FakeProducer()
        worker, _ = policy_worker(producer)

        def broken(*_: Any) -> Any:
            raise KeyError("TW-SECRET-CODE")

        worker.engine.apply = broken  # type: ignore[method-assign]
        await worker.handle(record(lab("e1", 20)), {})

        out = capsys.readouterr()
        assert "KeyError" in out.out + out.err
        assert "TW-SECRET-CODE" not in out.out + out.err


class TestBoundedDeadLetters:
    """Issue 10, defect 5: a 180 kB invalid record gave a 1.08 MB dead letter (over Kafka's limit: crash loop)."""

    @pytest.mark.parametrize("size", [180_000, 1_000_000], ids=["180kB", "1MB"])
    async def test_a_huge_record_gives_a_small_dead_letter_that_still_identifies_it(self, size: int) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)
        # Control characters quadruple in JSON (\u0001): the worst case for the letter's size.
        value = b'{"event_id": "' + b"\x01" * size + b'"}'

        await worker.handle(record(value, offset=9), {})

        [(_, _, raw)] = [s for s in producer.sent if s[0] == DEADLETTER]
        letter = json.loads(raw)
        assert len(raw) < 100_000
        assert (size + 16, hashlib.sha256(value).hexdigest(), True, 9) == (
            letter["payload_bytes"],
            letter["payload_sha256"],
            letter["payload_truncated"],
            letter["offset"],
        )
        assert value.decode().startswith(letter["payload"])

    async def test_a_huge_key_is_cut_too(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)

        await worker.handle(record(lab("e1", 40), key=b"k" * 500_000), {})

        [letter] = producer.on(DEADLETTER)
        assert ("key_mismatch", 256) == (letter["reason"], len(letter["key"]))

    async def test_a_small_record_is_kept_whole(self) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)

        await worker.handle(record(b"{not json", offset=1), {})

        [letter] = producer.on(DEADLETTER)
        assert ("{not json", False, 9) == (letter["payload"], letter["payload_truncated"], letter["payload_bytes"])


class TestReviewFindings:
    """Second round of issue 10 (a review): the tick path, internal dead letters, oversize states, blinded logs."""

    @pytest.mark.parametrize(
        "value", [b"[" * 100_000, b'{"subject_id": 5}', b'{"due_at": "x"}'], ids=["nested", "id-not-text", "no-id"]
    )
    async def test_a_tick_that_cannot_be_read_is_dead_lettered(self, value: bytes) -> None:
        producer = FakeProducer()
        worker, _ = policy_worker(producer)
        await worker.handle(Record(TICKS, 1, 4, b"S-1", value), {})
        assert [("processing_error", 4)] == [(d["reason"], d["offset"]) for d in producer.on(DEADLETTER)]

    async def test_a_tick_for_a_state_that_does_not_parse_is_dead_lettered(self) -> None:
        producer = FakeProducer()
        worker, _ = policy_worker(producer)
        states = {b"S-1": b'{"subject_id": "S-1", "from_a_newer_version": true}'}
        tick = Record(TICKS, 1, 4, b"S-1", tick_payload("S-1", datetime(2025, 3, 2, tzinfo=UTC)))
        await worker.handle(tick, states)
        assert ["processing_error"] == [d["reason"] for d in producer.on(DEADLETTER)]

    async def test_internal_dead_letters_show_neither_key_nor_payload(self) -> None:
        # Only SBRT subjects have deadlines and an arm fact names its arm: their
        # dead letters, read by operations and publishers, must show neither.
        producer = FakeProducer()
        worker, _ = policy_worker(producer, TickFailingEngine())
        states: dict[bytes, bytes] = {}
        await worker.handle(record(lab("e1", 160)), states)
        tick_value = tick_payload("S-1", datetime(2025, 3, 2, tzinfo=UTC))
        await worker.handle(Record(TICKS, 2, 7, b"S-1", tick_value), states)
        fact = b'{"subject_id": "S-1", "arm": "sbrt", "counted": "maybe", "event_id": "e"}'
        await worker.handle_arm_fact(Record(ARM_FACTS, 0, 3, b"sbrt", fact), {})

        letters = producer.on(DEADLETTER)
        assert [(None, "", True)] * 2 == [(d["key"], d["payload"], d["payload_truncated"]) for d in letters]
        assert [b"", b""] == [key for topic, key, _ in producer.sent if topic == DEADLETTER], "nor as the Kafka key"
        assert [hashlib.sha256(tick_value).hexdigest(), hashlib.sha256(fact).hexdigest()] == [
            d["payload_sha256"] for d in letters
        ]
        assert "S-1" not in json.dumps(letters)
        assert "sbrt" not in json.dumps(letters)

    async def test_a_state_too_large_to_save_is_not_written_and_the_record_is_dead_lettered(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        producer = FakeProducer()
        worker, _ = make_worker(producer)
        states: dict[bytes, bytes] = {}
        await worker.handle(record(lab("e1", 160), offset=0), states)
        saved = states[b"S-1"]
        monkeypatch.setattr("trialwatch.worker.MAX_STATE_BYTES", len(saved) + 10)

        await worker.handle(record(lab("e2", 20), offset=1), states)

        # The alert is out (it must not wait on a storage limit); the state is not written.
        assert ["lab.platelets.low"] == [a["rule"] for a in producer.on(ALERTS)]
        assert ["processing_error"] == [d["reason"] for d in producer.on(DEADLETTER)]
        assert saved is states[b"S-1"]

    async def test_no_log_line_for_an_alert_the_masked_stream_does_not_carry(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        producer = FakeProducer()
        worker, _ = policy_worker(producer)
        states: dict[bytes, bytes] = {}
        base = {"subject_id": "S-1", "site_id": "SITE-A"}
        events = [
            (ENROLLMENT, {**base, "event_id": "en", "occurred_at": "2025-03-01T08:00:00+08:00", "arm": "control",
                          "first_line_regimen": "lenvatinib", "age_years": 60, "kps": 90, "child_pugh_score": 6}),
            (TREATMENT, {**base, "event_id": "fx", "occurred_at": "2025-03-02T08:00:00+08:00",
                         "kind": "sbrt_fraction", "fraction": 1, "dose_gy": 8.0}),
        ]  # fmt: skip
        for offset, (topic, body) in enumerate(events):
            await worker.handle(Record(topic, 0, offset, b"S-1", json.dumps(body).encode()), states)

        assert "protocol.crossover" in [a["rule"] for a in producer.on(ALERTS)]
        out = capsys.readouterr()
        assert ("alert produced" in out.out + out.err, "crossover" in out.out + out.err) == (False, False)


class GatedProducer(FakeProducer):
    """Kafka that holds every acknowledgement until `release()`; what was sent is visible at once."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.held.append(fut)
        return fut

    def release(self) -> None:
        for fut in self.held:
            if not fut.done():
                fut.set_result(None)


class CountingStates:
    """A state store that records each write (partition, key) and can refuse the first `fail_first`."""

    def __init__(self, fail_first: int = 0) -> None:
        self.data: dict[bytes, bytes] = {}
        self.writes: list[tuple[int, bytes]] = []
        self.fail_first = fail_first

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, partition: int, key: bytes, value: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_first > 0:
            self.fail_first -= 1
            fut.set_exception(ConnectionError("changelog write refused"))
            return fut
        self.writes.append((partition, key))
        self.data[key] = value
        fut.set_result(None)
        return fut


NOW = datetime(2025, 3, 2, 9, 30, tzinfo=UTC)


def mixed_batch() -> list[Record]:
    """Two subjects interleaved, on two partitions; S-1 gets a low count then a recovery, S-2 two low counts."""
    rows = [
        ("S-1", 0, "a1", 40),
        ("S-2", 3, "b1", 45),
        ("S-1", 0, "a2", 160),
        ("S-2", 3, "b2", 20),
        ("S-1", 0, "a3", 30),
    ]
    return [
        Record(LABS, partition, offset, subject.encode(), lab(event_id, value, subject=subject))
        for offset, (subject, partition, event_id, value) in enumerate(rows)
    ]


class TestBatches:
    """Issue 12: a batch is computed, its outputs delivered, then each subject's state written once."""

    async def test_a_batch_sends_and_saves_what_record_by_record_processing_would(self) -> None:
        one_by_one, batched = FakeProducer(), FakeProducer()
        sequential, worker = (
            SubjectWorker(Engine(load_protocol()), Metrics(CollectorRegistry()), p.send, clock=lambda: NOW)
            for p in (one_by_one, batched)
        )
        seq_states: dict[bytes, bytes] = {}
        for rec in mixed_batch():
            await sequential.handle(rec, seq_states)
        store = CountingStates()

        await worker.handle_batch(mixed_batch(), store)

        assert one_by_one.sent == batched.sent
        assert seq_states == store.data
        assert len(batched.on(ALERTS)) >= 3, "the batch raises alerts for both subjects"

    async def test_each_subject_is_written_once_to_its_own_partition(self) -> None:
        worker, _ = make_worker(FakeProducer())
        store = CountingStates()

        await worker.handle_batch(mixed_batch(), store)

        assert sorted(store.writes) == [(0, b"S-1"), (3, b"S-2")]

    async def test_no_state_is_written_and_the_batch_not_done_before_kafka_has_every_output(self) -> None:
        producer = GatedProducer()
        worker, _ = make_worker(producer)
        store = CountingStates()

        task = asyncio.create_task(worker.handle_batch(mixed_batch(), store))
        await asyncio.sleep(0.02)
        assert producer.on(ALERTS), "the outputs were handed to the producer without waiting one by one"
        assert ([], False) == (store.writes, task.done())

        producer.release()
        await asyncio.wait_for(task, 1)
        assert {b"S-1", b"S-2"} == set(store.data)

    async def test_a_refused_state_write_is_retried_before_the_batch_is_done(self) -> None:
        worker, registry = make_worker(FakeProducer())
        store = CountingStates(fail_first=1)

        await worker.handle_batch(mixed_batch(), store)

        assert {b"S-1", b"S-2"} == set(store.data)
        assert registry.get_sample_value("trialwatch_send_retries_total", {"topic": "changelog"}) == 1.0

    async def test_a_record_failing_mid_batch_leaves_the_records_before_and_after_it_applied(self) -> None:
        engine = HalfwayFailingEngine()
        producer = FakeProducer()
        worker = SubjectWorker(engine, Metrics(CollectorRegistry()), producer.send)
        store = CountingStates()
        batch = [record(lab("e1", 160), offset=0), record(lab("e2", 20), offset=1), record(lab("e3", 30), offset=2)]
        calls = {"n": 0}
        real_apply = engine.apply

        def fail_on_second(state: Any, event: Any, now: Any) -> Any:
            calls["n"] += 1
            engine.fail_next = getattr(event, "event_id", None) == "e2" and calls["n"] == 2
            return real_apply(state, event, now)

        engine.apply = fail_on_second  # type: ignore[method-assign]
        await worker.handle_batch(batch, store)

        assert [("processing_error", 1)] == [(d["reason"], d["offset"]) for d in producer.on(DEADLETTER)]
        # e3 (30) alerted as a first low count: e2 (20) left no trace in the state.
        [alert] = producer.on(ALERTS)
        assert "e3" in json.dumps(alert["evidence"])
        # Re-sent once the bug is gone, e2 is a new result, not a duplicate.
        await worker.handle(record(lab("e2", 20), offset=3), store)
        assert 2 == len(producer.on(ALERTS))
