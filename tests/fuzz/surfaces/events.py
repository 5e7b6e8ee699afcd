"""decode → engine → worker shell: hospital records, mutated, through the real `SubjectWorker`.

The corpus is the demo cohort plus a small generated one. Each input takes
one of its records and either mutates the JSON value (a field replaced by a
hostile or edge value, deleted, or a key repeated), mutates its bytes, or
sends a tick or an arm fact, and hands it to the worker with the subject's
state as the corpus left it, so rules run against a real history. Outcome:
accepted when no dead letter came out, else refused with the dead letter's
reason; the sizes are those of every record the worker produced.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from tests.fuzz.harness import Outcome, Surface, deep_nesting, hostile_value, mutate_bytes
from tests.unit.test_worker import FakeProducer
from trialwatch.cohort import generate
from trialwatch.contract import DEADLETTER, INPUT_TOPICS
from trialwatch.demo import demo_cohort
from trialwatch.engine import Engine
from trialwatch.engine.toxicity import ArmFact
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file
from trialwatch.units import PLAUSIBLE
from trialwatch.worker import Record, SubjectWorker, tick_payload

TICKS = "fuzz-ticks"
ARM_FACTS = "fuzz-arm-facts"

EDGE_TIMES = (
    "2000-01-01T00:00:00+14:00",
    "2000-01-01T00:00:00-12:00",
    "2099-12-31T23:59:59.999999-12:00",
    "2099-12-31T23:59:59+14:00",
    "2025-03-01T00:00:00Z",
    "2025-02-28T23:59:59.999999+08:00",
    "2025-03-01T10:00:00+05:45",
)


class _Corpus:
    def __init__(self) -> None:
        lines = [line for line in demo_cohort(date(2025, 3, 1)).splitlines() if line.strip()]
        lines += [json.dumps(x) for x in generate(12, seed=7, start=date(2025, 1, 1))]
        self.records = [json.loads(line) for line in lines]
        engine = Engine(load_protocol())
        replay = Replay(engine)
        for _, event in read_event_file(lines):
            if not isinstance(event, BadLine):
                replay.apply(event)
        self.states = {sid: state.to_bytes() for sid, state in replay.states.items()}
        self.engine = engine


_corpus: _Corpus | None = None


def corpus() -> _Corpus:
    global _corpus
    if _corpus is None:
        _corpus = _Corpus()
    return _corpus


def _edge_number(rng: random.Random) -> Any:
    bounds = rng.choice(list(PLAUSIBLE.values()))
    pick = rng.choice((bounds.value_max, bounds.uln_min, bounds.uln_max, 0))
    return rng.choice((float(pick), float(pick) * rng.choice((0.999, 1.001, 0.5)), rng.uniform(0, float(pick) + 1)))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], new: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    if new is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = new


_DELETE = object()


_STRINGS = (
    "x" * 64,
    "e" * 128,
    "TW-001",
    "医院-广州",
    "a b",
    "Platelet count decreased",
    "final",
    "corrected",
    "cancelled",
    "preliminary",
    "withdrawal",
    "sbrt_fraction",
    "second_line_start",
    "systemic_held",
    "systemic_resumed",
    "sbrt_completed",
    "follow_up",
    "baseline",
    "new",
    "non_target",
    "10*3/uL",
    "/uL",
    "mg/dL",
    "g/dL",
)


def _replacement(rng: random.Random, old: Any) -> Any:
    """Mostly a value of the same kind that stays near the contract's edges, so the engine sees it."""
    if rng.random() < 0.25:
        return hostile_value(rng)
    if isinstance(old, bool):
        return not old
    if isinstance(old, int | float):
        number = _edge_number(rng)
        return int(number) if isinstance(old, int) else number
    if isinstance(old, str) and len(old) >= 20 and old[4:5] == "-" and "T" in old:
        return rng.choice(EDGE_TIMES)
    if isinstance(old, str):
        return rng.choice(_STRINGS)
    return hostile_value(rng)


def _mutated_value(rng: random.Random, value: dict[str, Any]) -> bytes:
    doc = copy.deepcopy(value)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = rng.choice(paths)
        old: Any = doc
        for p in path:
            old = old[p]
        _set(doc, path, _DELETE if rng.random() < 0.05 else _replacement(rng, old))
    raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05 and doc:
        key = rng.choice(list(doc))
        raw = raw[:-1] + f", {json.dumps(key)}: {json.dumps(hostile_value(rng))}}}"
    return raw.encode()


def generate_input(rng: random.Random) -> Record:
    c = corpus()
    base = rng.choice(c.records)
    topic, value = base["topic"], base["value"]
    subject = value["subject_id"].encode()
    roll = rng.random()
    if roll < 0.06:
        at = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(days=rng.uniform(0, 36_500))
        return Record(TICKS, 0, 0, subject, tick_payload(subject.decode(), at))
    if roll < 0.1:
        fact = {"subject_id": subject.decode(), "arm": "sbrt", "counted": True, "event_id": "e"}
        raw = _mutated_value(rng, fact) if rng.random() < 0.7 else json.dumps(fact).encode()
        return Record(ARM_FACTS, 0, 0, rng.choice((b"sbrt", b"control")), raw)
    if roll < 0.8:
        payload = _mutated_value(rng, value)
    elif roll < 0.97:
        payload = mutate_bytes(rng, json.dumps(value).encode())
    else:
        payload = deep_nesting(rng)
    if rng.random() < 0.03:
        topic = rng.choice(INPUT_TOPICS)
    return Record(topic, 0, 0, subject, payload)


_loop: asyncio.AbstractEventLoop | None = None


def check(record: Record) -> Outcome:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    c = corpus()
    sink = FakeProducer()
    clock = datetime(2025, 6, 1, tzinfo=UTC)
    worker = SubjectWorker(
        c.engine,
        Metrics(CollectorRegistry()),
        sink.send,
        ticks_topic=TICKS,
        arm_facts_topic=ARM_FACTS,
        clock=lambda: clock,
    )
    states = dict(c.states)
    if record.topic == ARM_FACTS:
        _loop.run_until_complete(worker.handle_arm_fact(record, {}))
    else:
        _loop.run_until_complete(worker.handle(record, states))
    sizes = [len(v) + len(k) for _, k, v in sink.sent]
    letters = [json.loads(v) for t, _, v in sink.sent if t == DEADLETTER]
    if letters:
        reason = letters[0]["reason"]
        if reason == "processing_error":
            if record.topic == ARM_FACTS and not _is_arm_fact(record.value or b""):
                return Outcome.refused("corrupt_arm_fact", *sizes)
            # The engine raised on something the contract accepted: a defect.
            raise AssertionError(f"processing_error: {letters[0]['detail']}")
        return Outcome.refused(reason, *sizes)
    return Outcome.ok(*sizes)


def _is_arm_fact(raw: bytes) -> bool:
    try:
        ArmFact.from_bytes(raw)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


_saved_logging: dict[str, Any] = {}


def _quiet() -> None:
    # Every rejection logs a warning: millions of lines in `make fuzz`.
    _saved_logging.update(structlog.get_config())
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _restore() -> None:
    structlog.configure(**_saved_logging)


SURFACE = Surface("events", generate_input, check, setup=_quiet, teardown=_restore)
