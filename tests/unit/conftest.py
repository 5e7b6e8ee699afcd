"""Unit-test helpers: valid v1 events with overridable fields, and a way to run them through the engine.

`make` builds events the way a publisher would send them (a JSON object per
message, decoded by `trialwatch.decode.decode`), so a test never holds an event
the service would have rejected. `apply_all` runs events through a fresh
engine in order and returns every alert message; `run` is the same thing kept
open, for tests that need to look at the messages of one particular event.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from trialwatch.contract import ADVERSE_EVENTS, ENROLLMENT, LABS, AlertMessage, InputEvent
from trialwatch.decode import Rejection, decode
from trialwatch.engine import Engine, SubjectState
from trialwatch.protocol import Protocol, load_protocol

# Every scenario happens in China Standard Time, so offsets other than UTC are the norm.
CST = timezone(timedelta(hours=8))
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=CST)

ApplyAll = Callable[[Iterable[InputEvent]], list[AlertMessage]]

TOPIC_BY_KIND = {"lab": LABS, "ae": ADVERSE_EVENTS, "enrollment": ENROLLMENT}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "lab": {"analyte": "platelets", "value": 160.0, "unit": "10*9/L"},
    "ae": {"term": "Fatigue", "grade": 1, "serious": False, "attribution": "possible"},
    "enrollment": {
        "arm": "sbrt",
        "first_line_regimen": "atezolizumab+bevacizumab",
        "age_years": 58,
        "kps": 90,
        "child_pugh_score": 6,
    },
}


class EventFactory:
    """Valid events with overridable fields.

    `day` places `occurred_at` that many days after T0 (2025-03-01T08:00+08:00)
    unless `occurred_at` is given; a field overridden with None is left out of
    the message; event ids count up (`lab-0001`, `ae-0002`, ...) unless given.
    """

    def __init__(self) -> None:
        self._numbers = itertools.count(1)

    def body(self, kind: str, *, day: float = 0, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event_id": f"{kind}-{next(self._numbers):04d}",
            "subject_id": "TW-001",
            "site_id": "SITE-GZ",
            "occurred_at": (T0 + timedelta(days=day)).isoformat(),
            **_DEFAULTS[kind],
        }
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}

    def line(self, kind: str, **overrides: Any) -> str:
        """One line of an event file: `{"topic": ..., "value": {...}}`."""
        return json.dumps({"topic": TOPIC_BY_KIND[kind], "value": self.body(kind, **overrides)})

    def event(self, kind: str, **overrides: Any) -> InputEvent:
        body = self.body(kind, **overrides)
        result = decode(TOPIC_BY_KIND[kind], json.dumps(body).encode())
        if isinstance(result, Rejection):
            raise AssertionError(f"the test built an invalid {kind} event {body}: {result.reason}: {result.detail}")
        return result

    def lab(self, **overrides: Any) -> InputEvent:
        return self.event("lab", **overrides)

    def ae(self, **overrides: Any) -> InputEvent:
        return self.event("ae", **overrides)

    def enrollment(self, **overrides: Any) -> InputEvent:
        return self.event("enrollment", **overrides)


class EngineRun:
    """A fresh engine's run over events in order, one state per subject, on an event-time clock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.states: dict[str, SubjectState] = {}
        self.clock: datetime | None = None

    def apply(self, event: InputEvent) -> list[AlertMessage]:
        if self.clock is None or event.occurred_at > self.clock:
            self.clock = event.occurred_at
        state, alerts = self.engine.apply(self.states.get(event.subject_id), event, self.clock)
        self.states[event.subject_id] = state
        return alerts

    def apply_all(self, events: Iterable[InputEvent]) -> list[AlertMessage]:
        return [alert for event in events for alert in self.apply(event)]


@pytest.fixture(scope="session")
def protocol() -> Protocol:
    return load_protocol()


@pytest.fixture
def make() -> EventFactory:
    return EventFactory()


@pytest.fixture
def run(protocol: Protocol) -> EngineRun:
    return EngineRun(Engine(protocol))


@pytest.fixture
def apply_all(protocol: Protocol) -> ApplyAll:
    """Run events through a fresh engine and return all alert messages, in order."""

    def _apply_all(events: Iterable[InputEvent]) -> list[AlertMessage]:
        return EngineRun(Engine(protocol)).apply_all(events)

    return _apply_all
