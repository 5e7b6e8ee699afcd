"""Issue 10, defect 5: no output record can exceed what the broker accepts.

A valid adverse event with a 600 kB term gave a 1.2 MB alert; past the
producer's max_request_size the send failed, the worker exited and re-read the
record forever. The input is now bounded by the contract and every alert's
evidence by the lifecycle, whatever a rule gathers.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from tests.unit.test_worker import FakeProducer, make_worker, record
from trialwatch.contract import ADVERSE_EVENTS, DEADLETTER
from trialwatch.engine.lifecycle import MAX_EVIDENCE_LIST, AlertBook, Memory
from trialwatch.engine.state import SubjectState
from trialwatch.worker import Record

KAFKA_DEFAULT_MAX = 1_048_588


async def test_the_600_kB_term_gives_a_small_dead_letter_not_a_1_MB_alert() -> None:
    producer = FakeProducer()
    worker, _ = make_worker(producer)
    body = {
        "event_id": "ae-1",
        "subject_id": "S-1",
        "site_id": "SITE-A",
        "occurred_at": "2025-03-01T08:00:00+08:00",
        "term": "x" * 600_000,
        "grade": 4,
        "serious": True,
        "attribution": "possible",
    }
    await worker.handle(Record(ADVERSE_EVENTS, 0, 5, b"S-1", json.dumps(body).encode()), {})

    assert [DEADLETTER] == [t for t, _, _ in producer.sent]
    assert max(len(v) for _, _, v in producer.sent) < 100_000


def test_an_alert_is_bounded_whatever_a_rule_gathers() -> None:
    state = SubjectState(subject_id="S-1", site_id="SITE-A")
    at = datetime(2025, 3, 1, tzinfo=UTC)
    book = AlertBook(state, "NCT06592612", at, at, Memory(frozenset(), frozenset()))
    book.open(
        rule="lab.platelets.low",
        key="platelets",
        opening_event_id="e1",
        severity="high",
        started_at=at,
        evidence={"event_ids": [f"event-{i:06d}" for i in range(50_000)], "note": "n" * 2_000_000},
        summary="s" * 50_000,
    )
    [message] = book.messages
    size = len(message.model_dump_json())
    assert size < 64 * 1024 < KAFKA_DEFAULT_MAX
    ids = message.evidence["event_ids"]
    assert (MAX_EVIDENCE_LIST + 1, "… and 49900 more") == (len(ids), ids[-1])


async def test_every_output_of_a_hostile_scan_fits() -> None:
    producer = FakeProducer()
    worker, _ = make_worker(producer)
    lesions = [
        {"lesion_id": f"L{i}" + "x" * 100, "organ": "o" * 200, "role": "new"} for i in range(100)
    ]  # the contract's maxima
    base = {"subject_id": "S-1", "site_id": "SITE-A", "occurred_at": "2025-03-01T08:00:00+08:00"}
    baseline = {**base, "event_id": "s0", "scan_id": "B", "timepoint": "baseline", "modality": "CT", "lesions": []}
    follow = {**base, "event_id": "s1", "scan_id": "F", "timepoint": "follow_up", "modality": "CT", "lesions": lesions}
    states: dict[bytes, bytes] = {}
    for i, scan in enumerate((baseline, follow)):
        await worker.handle(Record("trial.scans.v1", 0, i, b"S-1", json.dumps(scan).encode()), states)
    assert [] == [t for t, _, _ in producer.sent if t == DEADLETTER]
    assert producer.sent, "the new lesions raised recist.progression"
    assert max(len(v) for _, _, v in producer.sent) < 100_000


async def test_a_record_that_is_not_an_event_never_reaches_a_big_output() -> None:
    producer = FakeProducer()
    worker, _ = make_worker(producer)
    await worker.handle(record(b"\x00" * 2_000_000), {})
    assert max(len(v) for _, _, v in producer.sent) < 100_000
