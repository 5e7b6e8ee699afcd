"""Treatment rules against contract v1: the SBRT start window and the protocol deviations.

Everything here is derived from `events-v1.md` (rule catalogue, "Calendar days
count in the UTC offset of the second-line start event", "Second-line
stipulation", the alert lifecycle, "Event files (replay ...)") and the
thresholds of `seeds/protocol-v1.toml`: at risk after the end of calendar day
10, missed after the end of calendar day 14. Reference scenario: second-line
start 2025-03-01T20:00+08:00 on the SBRT arm, so at risk at
2025-03-12T00:00+08:00 and missed at 2025-03-16T00:00+08:00.

Two drivers run the engine: `Replay` (the event-time clock of `trialwatch
replay`, which fires a deadline before an event that passes it) and the engine
directly, with explicit `Tick`s as the live service sends them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.contract import TREATMENT, AlertMessage, InputEvent, mask
from trialwatch.decode import Rejection, decode
from trialwatch.engine import Engine, SubjectState, Tick
from trialwatch.replay import Replay

if TYPE_CHECKING:
    from tests.unit.conftest import EngineRun, EventFactory
    from trialwatch.protocol import Protocol

ENROLLED = "2025-02-26T10:00:00+08:00"
START = "2025-03-01T20:00:00+08:00"
AT_RISK = "2025-03-12T00:00:00+08:00"
MISSED = "2025-03-16T00:00:00+08:00"
AS_OF = "2025-04-30T00:00:00+08:00"
SECOND = timedelta(seconds=1)

WINDOW_RULES = ("sbrt.window.at_risk", "sbrt.window.missed")
DEVIATION_RULES = ("protocol.crossover", "protocol.systemic_held_during_sbrt", "protocol.regimen_mismatch")


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --------------------------------------------------------------------------- builders and drivers


class Timeline:
    """Valid events of one subject (TW-001) at given RFC 3339 times.

    Enrolments and labs come from conftest's `EventFactory`; treatment events
    are built here the same way, as a publisher's JSON decoded by `decode`.
    """

    def __init__(self, make: EventFactory) -> None:
        self.make = make
        self._ids = itertools.count(1)

    def enrollment(
        self, at: str = ENROLLED, *, arm: str = "sbrt", first_line: str = "atezolizumab+bevacizumab"
    ) -> InputEvent:
        return self.make.enrollment(occurred_at=at, arm=arm, first_line_regimen=first_line)

    def lab(self, at: str) -> InputEvent:
        """A normal platelet count: raises nothing itself, only moves the replay clock."""
        return self.make.lab(occurred_at=at, analyte="platelets", value=160.0, unit="10*9/L")

    def treatment(self, kind: str, at: str, **fields: Any) -> InputEvent:
        body: dict[str, Any] = {
            "event_id": f"tx-{next(self._ids):04d}",
            "subject_id": "TW-001",
            "site_id": "SITE-GZ",
            "occurred_at": at,
            "kind": kind,
            **fields,
        }
        result = decode(TREATMENT, json.dumps(body).encode())
        if isinstance(result, Rejection):
            raise AssertionError(f"the test built an invalid treatment event {body}: {result.reason}: {result.detail}")
        return result

    def start(self, at: str = START, regimen: str = "lenvatinib") -> InputEvent:
        return self.treatment("second_line_start", at, regimen=regimen)

    def fraction(self, at: str, number: int = 1) -> InputEvent:
        return self.treatment("sbrt_fraction", at, fraction=number, dose_gy=8.0)

    def completed(self, at: str) -> InputEvent:
        return self.treatment("sbrt_completed", at)

    def held(self, at: str) -> InputEvent:
        return self.treatment("systemic_held", at)

    def resumed(self, at: str) -> InputEvent:
        return self.treatment("systemic_resumed", at)

    def withdrawal(self, at: str, reason: str) -> InputEvent:
        return self.treatment("withdrawal", at, reason=reason)

    def step(self, kind: str, at: str, *args: Any) -> InputEvent:
        """One row of a scenario table: `(kind, at, *args)` with kind a method name above."""
        builder = {
            "enrol_sbrt": lambda: self.enrollment(at, arm="sbrt"),
            "enrol_control": lambda: self.enrollment(at, arm="control"),
            "lab": lambda: self.lab(at),
            "start": lambda: self.start(at, *args),
            "fraction": lambda: self.fraction(at, *args),
            "completed": lambda: self.completed(at),
            "held": lambda: self.held(at),
            "resumed": lambda: self.resumed(at),
            "withdrawal": lambda: self.withdrawal(at, *args),
        }[kind]
        return builder()


class Direct:
    """One subject through `Engine.apply` directly, with ticks as the live service sends them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state: SubjectState | None = None
        self.clock: datetime | None = None

    def _now(self, at: datetime) -> datetime:
        if self.clock is None or at > self.clock:
            self.clock = at
        return self.clock

    def event(self, event: InputEvent) -> list[AlertMessage]:
        self.state, alerts = self.engine.apply(self.state, event, self._now(event.occurred_at))
        return alerts

    def tick(self, at: str | datetime) -> list[AlertMessage]:
        when = ts(at) if isinstance(at, str) else at
        self.state, alerts = self.engine.apply(self.state, Tick("TW-001", when), self._now(when))
        return alerts

    @property
    def next_deadline_at(self) -> datetime | None:
        assert self.state is not None
        return self.state.next_deadline_at


def replay_all(engine: Engine, events: Sequence[InputEvent], as_of: str | None = AS_OF) -> list[AlertMessage]:
    """The messages `trialwatch replay` would print for these events, in file order, then `--as-of`."""
    replay = Replay(engine)
    out = [alert for event in events for alert in replay.apply(event)]
    return out + replay.finish(ts(as_of) if as_of else None)


def ticked_all(engine: Engine, events: Sequence[InputEvent], ticks: Sequence[str]) -> list[AlertMessage]:
    """The engine driven directly: events and ticks in clinical-time order, a tick before an event at its instant."""
    timeline: list[tuple[datetime, int, InputEvent | str]] = [(ts(t), 0, t) for t in ticks]
    timeline += [(e.occurred_at, 1, e) for e in events]
    direct = Direct(engine)
    out: list[AlertMessage] = []
    for _, _, item in sorted(timeline, key=lambda x: (x[0], x[1])):
        out += direct.tick(item) if isinstance(item, str) else direct.event(item)
    return out


def window(alerts: list[AlertMessage]) -> list[tuple[str, str, datetime]]:
    """The window rules' messages as (rule, status, occurred_at), ordered by clinical time, rule and revision."""
    mine = [a for a in alerts if a.rule in WINDOW_RULES]
    mine.sort(key=lambda a: (a.occurred_at, a.rule, a.revision))
    return [(a.rule, a.status, a.occurred_at) for a in mine]


def firing(alerts: list[AlertMessage], rules: Sequence[str] = WINDOW_RULES) -> list[tuple[str, datetime]]:
    return sorted((a.rule, a.occurred_at) for a in alerts if a.rule in rules and a.status == "firing")


def of_rule(alerts: list[AlertMessage], rule: str) -> list[AlertMessage]:
    return [a for a in alerts if a.rule == rule]


@pytest.fixture
def engine(protocol: Protocol) -> Engine:
    return Engine(protocol)


@pytest.fixture
def tl(make: EventFactory) -> Timeline:
    return Timeline(make)


# The messages of the reference scenario when no fraction comes: at risk at the
# end of day 10, missed at the end of day 14, which supersedes (resolves) at risk.
NO_FRACTION = [
    ("sbrt.window.at_risk", "firing", ts(AT_RISK)),
    ("sbrt.window.at_risk", "resolved", ts(MISSED)),
    ("sbrt.window.missed", "firing", ts(MISSED)),
]

# --------------------------------------------------------------------------- 1. window boundaries

# (start as sent, end of day 10 in the start's offset, end of day 14 in the start's offset)
START_OFFSET_CASES = [
    pytest.param(START, AT_RISK, MISSED, id="cst-2025-03-01T20:00+08"),
    # The same instant in UTC: still 2025-03-01 there, but midnight is UTC midnight.
    pytest.param(
        "2025-03-01T12:00:00+00:00", "2025-03-12T00:00:00+00:00", "2025-03-16T00:00:00+00:00", id="utc-same-instant"
    ),
    # 2025-03-02 in +08:00 but 2025-03-01 in UTC.
    pytest.param(
        "2025-03-02T02:00:00+08:00", "2025-03-13T00:00:00+08:00", "2025-03-17T00:00:00+08:00", id="cst-02T02:00"
    ),
    pytest.param(
        "2025-03-01T18:00:00+00:00",
        "2025-03-12T00:00:00+00:00",
        "2025-03-16T00:00:00+00:00",
        id="utc-same-instant-as-cst-02T02:00",
    ),
    # 2025-03-01 in -05:00 but 2025-03-02 in UTC and in +08:00.
    pytest.param(
        "2025-03-01T23:30:00-05:00", "2025-03-12T00:00:00-05:00", "2025-03-16T00:00:00-05:00", id="est-01T23:30"
    ),
    pytest.param(
        "2025-03-02T04:30:00+00:00",
        "2025-03-13T00:00:00+00:00",
        "2025-03-17T00:00:00+00:00",
        id="utc-same-instant-as-est-01T23:30",
    ),
    pytest.param("2025-03-01T00:00:00+08:00", AT_RISK, MISSED, id="cst-start-at-midnight"),
    pytest.param("2025-03-01T23:59:59+08:00", AT_RISK, MISSED, id="cst-start-last-second-of-day"),
    pytest.param(
        "2025-03-01T00:30:00+05:45",
        "2025-03-12T00:00:00+05:45",
        "2025-03-16T00:00:00+05:45",
        id="npt-+05:45-previous-utc-day",
    ),
]


class TestWindowDeadlinesInStartOffset:
    """No fraction: at risk fires at the end of calendar day 10, missed at the end of day 14, in the start's offset."""

    @pytest.mark.parametrize(("start", "at_risk", "missed"), START_OFFSET_CASES)
    def test_replay_to_as_of(self, engine: Engine, tl: Timeline, start: str, at_risk: str, missed: str) -> None:
        alerts = replay_all(engine, [tl.enrollment(), tl.start(start)])
        expected = [("sbrt.window.at_risk", ts(at_risk)), ("sbrt.window.missed", ts(missed))]
        assert expected == firing(alerts)

    @pytest.mark.parametrize(("start", "at_risk", "missed"), START_OFFSET_CASES)
    def test_replay_raised_at_is_the_deadline(
        self, engine: Engine, tl: Timeline, start: str, at_risk: str, missed: str
    ) -> None:
        alerts = replay_all(engine, [tl.enrollment(), tl.start(start)])
        expected = {"sbrt.window.at_risk": ts(at_risk), "sbrt.window.missed": ts(missed)}
        assert expected == {a.rule: a.raised_at for a in alerts if a.rule in WINDOW_RULES and a.status == "firing"}

    @pytest.mark.parametrize(("start", "at_risk", "missed"), START_OFFSET_CASES)
    def test_replay_fires_before_the_event_that_passes_a_deadline(
        self, engine: Engine, tl: Timeline, start: str, at_risk: str, missed: str
    ) -> None:
        replay = Replay(engine)
        replay.apply(tl.enrollment())
        replay.apply(tl.start(start))
        probes = [
            (ts(at_risk) - SECOND).isoformat(),
            at_risk,
            (ts(missed) - SECOND).isoformat(),
            missed,
        ]
        actual = [firing(replay.apply(tl.lab(at))) for at in probes]
        expected = [
            [],
            [("sbrt.window.at_risk", ts(at_risk))],
            [],
            [("sbrt.window.missed", ts(missed))],
        ]
        assert expected == actual


class TestTickAtDeadline:
    """Driven directly, a tick exactly at a window deadline fires it; a tick one second before fires nothing."""

    @pytest.mark.parametrize(("start", "at_risk", "missed"), START_OFFSET_CASES)
    def test_ticks(self, engine: Engine, tl: Timeline, start: str, at_risk: str, missed: str) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start(start))
        actual = [
            window(direct.tick(ts(at_risk) - SECOND)),
            window(direct.tick(at_risk)),
            window(direct.tick(ts(missed) - SECOND)),
            window(direct.tick(missed)),
        ]
        expected = [
            [],
            [("sbrt.window.at_risk", "firing", ts(at_risk))],
            [],
            [
                ("sbrt.window.at_risk", "resolved", ts(missed)),
                ("sbrt.window.missed", "firing", ts(missed)),
            ],
        ]
        assert expected == actual

    @pytest.mark.parametrize(("start", "at_risk", "missed"), START_OFFSET_CASES)
    def test_missed_alert_occurred_at(
        self, engine: Engine, tl: Timeline, start: str, at_risk: str, missed: str
    ) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start(start))
        direct.tick(at_risk)
        alerts = of_rule(direct.tick(missed), "sbrt.window.missed")
        expected = [ts(missed)]
        assert expected == [a.occurred_at for a in alerts]


# (first fraction as sent, window messages for the reference start 2025-03-01T20:00+08:00)
FRACTION_BOUNDARY_CASES = [
    pytest.param("2025-03-02T09:00:00+08:00", [], id="day-1"),
    pytest.param("2025-03-11T23:59:59+08:00", [], id="last-second-of-day-10"),
    pytest.param(
        "2025-03-12T00:00:00+08:00",
        [("sbrt.window.at_risk", "firing", ts(AT_RISK)), ("sbrt.window.at_risk", "resolved", ts(AT_RISK))],
        id="first-second-of-day-11",
    ),
    pytest.param(
        "2025-03-15T23:59:00+08:00",
        [
            ("sbrt.window.at_risk", "firing", ts(AT_RISK)),
            ("sbrt.window.at_risk", "resolved", ts("2025-03-15T23:59:00+08:00")),
        ],
        id="day-14-23:59",
    ),
    pytest.param(
        "2025-03-15T23:59:59+08:00",
        [
            ("sbrt.window.at_risk", "firing", ts(AT_RISK)),
            ("sbrt.window.at_risk", "resolved", ts("2025-03-15T23:59:59+08:00")),
        ],
        id="day-14-last-second",
    ),
    pytest.param("2025-03-16T00:00:00+08:00", NO_FRACTION, id="day-15-midnight-missed"),
    pytest.param("2025-03-16T09:00:00+08:00", NO_FRACTION, id="day-15-morning-missed"),
    # Other offsets: compared as instants, not by their local date.
    pytest.param(
        "2025-03-15T15:59:59+00:00",
        [
            ("sbrt.window.at_risk", "firing", ts(AT_RISK)),
            ("sbrt.window.at_risk", "resolved", ts("2025-03-15T23:59:59+08:00")),
        ],
        id="utc-15T15:59:59-is-in-time",
    ),
    pytest.param("2025-03-15T16:00:00+00:00", NO_FRACTION, id="utc-15T16:00-local-date-15-is-late"),
    pytest.param("2025-03-15T12:00:00-04:00", NO_FRACTION, id="minus4-15T12:00-local-date-15-is-late"),
    pytest.param(
        "2025-03-16T00:30:00+09:00",
        [
            ("sbrt.window.at_risk", "firing", ts(AT_RISK)),
            ("sbrt.window.at_risk", "resolved", ts("2025-03-15T23:30:00+08:00")),
        ],
        id="plus9-16T00:30-local-date-16-is-in-time",
    ),
    pytest.param("2025-03-12T00:30:00+09:00", [], id="plus9-12T00:30-is-before-day-10-ends"),
]


class TestFirstFractionBoundary:
    """A first fraction before 2025-03-16T00:00+08:00 (as an instant) keeps the window; one at or after it is missed."""

    @pytest.mark.parametrize(("fraction_at", "expected"), FRACTION_BOUNDARY_CASES)
    def test_replay(
        self, engine: Engine, tl: Timeline, fraction_at: str, expected: list[tuple[str, str, datetime]]
    ) -> None:
        alerts = replay_all(engine, [tl.enrollment(), tl.start(), tl.fraction(fraction_at)])
        assert expected == window(alerts)

    @pytest.mark.parametrize(("fraction_at", "expected"), FRACTION_BOUNDARY_CASES)
    def test_engine_ticks(
        self, engine: Engine, tl: Timeline, fraction_at: str, expected: list[tuple[str, str, datetime]]
    ) -> None:
        alerts = ticked_all(engine, [tl.enrollment(), tl.start(), tl.fraction(fraction_at)], [AT_RISK, MISSED, AS_OF])
        assert expected == window(alerts)

    @pytest.mark.parametrize("fraction_at", ["2025-03-16T00:00:00+08:00", "2025-03-15T16:00:00+00:00"])
    def test_missed_occurred_at_is_the_deadline(self, engine: Engine, tl: Timeline, fraction_at: str) -> None:
        alerts = replay_all(engine, [tl.enrollment(), tl.start(), tl.fraction(fraction_at)])
        missed = of_rule(alerts, "sbrt.window.missed")
        expected = [("firing", "2025-03-16T00:00:00+08:00")]
        assert expected == [(a.status, a.occurred_at.astimezone(ts(START).tzinfo).isoformat()) for a in missed]


# --------------------------------------------------------------------------- 2. lifecycle


# (late fraction's occurred_at, does it resolve sbrt.window.missed)
LATE_FRACTION_CASES = [
    pytest.param("2025-03-14T10:00:00+08:00", True, id="day-13"),
    pytest.param("2025-03-15T23:59:59+08:00", True, id="day-14-last-second"),
    pytest.param("2025-03-15T15:59:59+00:00", True, id="utc-instant-inside"),
    pytest.param("2025-03-13T09:00:00+08:00", True, id="during-at-risk-period"),
    pytest.param("2025-03-05T09:00:00+08:00", True, id="before-at-risk-deadline"),
    pytest.param("2025-03-16T00:00:00+08:00", False, id="window-close-instant"),
    pytest.param("2025-03-15T16:00:00+00:00", False, id="utc-instant-at-close"),
    pytest.param("2025-03-18T10:00:00+08:00", False, id="after-window"),
]


class TestLateReportedFraction:
    """A fraction reported after `missed` fired resolves it when its occurred_at is inside the window, else nothing."""

    @pytest.mark.parametrize(("fraction_at", "resolves"), LATE_FRACTION_CASES)
    def test_replay(self, engine: Engine, tl: Timeline, fraction_at: str, resolves: bool) -> None:
        replay = Replay(engine)
        before = [
            a for e in (tl.enrollment(), tl.start(), tl.lab("2025-03-20T09:00:00+08:00")) for a in replay.apply(e)
        ]
        fired = of_rule(before, "sbrt.window.missed")
        expected_fired = [("firing", 1)]
        assert expected_fired == [(a.status, a.revision) for a in fired]
        actual = [(a.alert_id, a.rule, a.status, a.revision) for a in replay.apply(tl.fraction(fraction_at))]
        expected = [(fired[0].alert_id, "sbrt.window.missed", "resolved", 2)] if resolves else []
        assert expected == actual

    @pytest.mark.parametrize(("fraction_at", "resolves"), LATE_FRACTION_CASES)
    def test_engine_ticks(self, engine: Engine, tl: Timeline, fraction_at: str, resolves: bool) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start())
        direct.tick(AT_RISK)
        fired = of_rule(direct.tick(MISSED), "sbrt.window.missed")
        direct.tick("2025-03-20T09:00:00+08:00")  # the wall clock moves on before the report arrives
        actual = [(a.alert_id, a.rule, a.status, a.revision) for a in direct.event(tl.fraction(fraction_at))]
        expected = [(fired[0].alert_id, "sbrt.window.missed", "resolved", 2)] if resolves else []
        assert expected == actual

    @pytest.mark.parametrize(("fraction_at", "resolves"), LATE_FRACTION_CASES)
    def test_final_state_after_as_of(self, engine: Engine, tl: Timeline, fraction_at: str, resolves: bool) -> None:
        alerts = replay_all(
            engine, [tl.enrollment(), tl.start(), tl.lab("2025-03-20T09:00:00+08:00"), tl.fraction(fraction_at)]
        )
        last = {a.rule: a.status for a in alerts if a.rule in WINDOW_RULES}
        expected = {"sbrt.window.at_risk": "resolved", "sbrt.window.missed": "resolved" if resolves else "firing"}
        assert expected == last


class TestAtRiskResolvedByFraction:
    """A fraction in the at-risk period resolves `at_risk` (same alert, next revision) and `missed` never fires."""

    @pytest.mark.parametrize(
        "fraction_at",
        [
            pytest.param("2025-03-12T00:00:00+08:00", id="at-the-at-risk-deadline"),
            pytest.param("2025-03-13T09:00:00+08:00", id="day-12"),
            pytest.param("2025-03-15T23:59:59+08:00", id="last-second"),
            pytest.param("2025-03-13T01:00:00+00:00", id="utc-offset"),
        ],
    )
    @pytest.mark.parametrize("driver", ["replay", "engine_ticks"])
    def test_resolved(self, engine: Engine, tl: Timeline, driver: str, fraction_at: str) -> None:
        events = [tl.enrollment(), tl.start(), tl.fraction(fraction_at)]
        alerts = (
            replay_all(engine, events) if driver == "replay" else ticked_all(engine, events, [AT_RISK, MISSED, AS_OF])
        )
        at_risk = of_rule(alerts, "sbrt.window.at_risk")
        expected = [("firing", 1, ts(AT_RISK)), ("resolved", 2, ts(fraction_at))]
        assert expected == [(a.status, a.revision, a.occurred_at) for a in at_risk]
        expected_ids = {at_risk[0].alert_id}
        assert expected_ids == {a.alert_id for a in at_risk}
        expected_missed: list[AlertMessage] = []
        assert expected_missed == of_rule(alerts, "sbrt.window.missed")


class TestMissedSupersedesAtRisk:
    """When `missed` fires, the open `at_risk` alert is resolved in the same step."""

    @pytest.mark.parametrize("driver", ["replay", "engine_ticks"])
    def test_superseded(self, engine: Engine, tl: Timeline, driver: str) -> None:
        events = [tl.enrollment(), tl.start()]
        alerts = replay_all(engine, events) if driver == "replay" else ticked_all(engine, events, [AT_RISK, MISSED])
        assert NO_FRACTION == window(alerts)
        at_risk = of_rule(alerts, "sbrt.window.at_risk")
        expected = [("firing", 1), ("resolved", 2)]
        assert expected == [(a.status, a.revision) for a in at_risk]
        assert at_risk[0].alert_id == at_risk[1].alert_id

    def test_same_tick(self, engine: Engine, tl: Timeline) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start())
        direct.tick(AT_RISK)
        actual = sorted((a.rule, a.status) for a in direct.tick(MISSED))
        expected = [("sbrt.window.at_risk", "resolved"), ("sbrt.window.missed", "firing")]
        assert expected == actual


# Steps after both deadlines fired (at risk, missed, at risk superseded).
# "dup:start" re-sends the second-line start, "dup:enrollment" the enrolment.
REPEAT_CASES = [
    pytest.param([("tick", MISSED)], id="tick-at-missed-again"),
    pytest.param([("tick", AT_RISK)], id="tick-at-at-risk-again"),
    pytest.param([("tick", "2025-03-16T01:00:00+08:00"), ("tick", AS_OF)], id="later-ticks"),
    pytest.param([("dup", "start")], id="duplicate-start"),
    pytest.param([("dup", "enrollment")], id="duplicate-enrollment"),
    pytest.param(
        [("dup", "start"), ("tick", AS_OF), ("dup", "enrollment"), ("tick", AS_OF)], id="duplicates-and-ticks"
    ),
    pytest.param([("lab", "2025-03-20T09:00:00+08:00")], id="other-topic-event"),
    pytest.param([("fraction", "2025-03-20T09:00:00+08:00"), ("tick", AS_OF)], id="fraction-after-window"),
]


class TestWindowAlertsFireOnce:
    """Each window alert fires once: repeat ticks and re-sent events produce no new message."""

    @pytest.mark.parametrize("steps", REPEAT_CASES)
    def test_engine_ticks(self, engine: Engine, tl: Timeline, steps: list[tuple[str, str]]) -> None:
        direct = Direct(engine)
        enrollment, start = tl.enrollment(), tl.start()
        direct.event(enrollment)
        direct.event(start)
        before = direct.tick(AT_RISK) + direct.tick(MISSED)
        assert NO_FRACTION == window(before)
        after: list[AlertMessage] = []
        for kind, arg in steps:
            if kind == "tick":
                after += direct.tick(arg)
            elif kind == "dup":
                after += direct.event({"start": start, "enrollment": enrollment}[arg])
            else:
                after += direct.event(tl.step(kind, arg))
        expected: list[tuple[str, str, datetime]] = []
        assert expected == window(after)

    @pytest.mark.parametrize(
        "ticks",
        [
            pytest.param([AT_RISK], id="same-instant"),
            pytest.param(["2025-03-12T00:00:01+08:00", "2025-03-14T00:00:00+08:00"], id="later-in-at-risk-period"),
            pytest.param([(ts(MISSED) - SECOND).isoformat()], id="second-before-missed"),
        ],
    )
    def test_at_risk_repeat_ticks(self, engine: Engine, tl: Timeline, ticks: list[str]) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start())
        expected_first = [("sbrt.window.at_risk", "firing", ts(AT_RISK))]
        assert expected_first == window(direct.tick(AT_RISK))
        expected: list[tuple[str, str, datetime]] = []
        assert expected == window([a for t in ticks for a in direct.tick(t)])

    def test_replay_duplicate_lines(self, engine: Engine, tl: Timeline) -> None:
        enrollment, start = tl.enrollment(), tl.start()
        alerts = replay_all(
            engine,
            [enrollment, start, tl.lab("2025-03-13T09:00:00+08:00"), start, enrollment, tl.lab(MISSED), start],
        )
        assert NO_FRACTION == window(alerts)

    def test_late_fraction_resolution_is_final(self, engine: Engine, tl: Timeline) -> None:
        direct = Direct(engine)
        direct.event(tl.enrollment())
        direct.event(tl.start())
        direct.tick(AT_RISK)
        direct.tick(MISSED)
        fraction = tl.fraction("2025-03-14T10:00:00+08:00")
        expected_first = [("sbrt.window.missed", "resolved")]
        assert expected_first == [(a.rule, a.status) for a in direct.event(fraction)]
        again = direct.event(fraction) + direct.tick(AS_OF) + direct.event(tl.fraction("2025-03-20T10:00:00+08:00", 2))
        expected: list[tuple[str, str, datetime]] = []
        assert expected == window(again)


CONTROL_CASES = [
    pytest.param([("enrol_control", ENROLLED), ("start", START)], id="no-fraction"),
    pytest.param(
        [("enrol_control", ENROLLED), ("start", START), ("lab", "2025-03-13T00:00:00+08:00"), ("lab", MISSED)],
        id="events-passing-deadlines",
    ),
    pytest.param(
        [("enrol_control", ENROLLED), ("start", START), ("fraction", "2025-03-20T09:00:00+08:00")],
        id="fraction-after-window",
    ),
    pytest.param([("start", START), ("enrol_control", ENROLLED)], id="enrolled-after-start"),
    pytest.param(
        [("start", START), ("lab", "2025-03-20T09:00:00+08:00"), ("enrol_control", ENROLLED)],
        id="enrolled-after-deadlines",
    ),
]


class TestControlArmHasNoWindow:
    """The control arm never gets `sbrt.window.*` alerts, whatever the clock does."""

    @pytest.mark.parametrize("steps", CONTROL_CASES)
    def test_replay(self, engine: Engine, tl: Timeline, steps: list[tuple[str, str]]) -> None:
        alerts = replay_all(engine, [tl.step(kind, at) for kind, at in steps])
        expected: list[tuple[str, str, datetime]] = []
        assert expected == window(alerts)

    @pytest.mark.parametrize("steps", CONTROL_CASES)
    def test_engine_ticks(self, engine: Engine, tl: Timeline, steps: list[tuple[str, str]]) -> None:
        alerts = ticked_all(engine, [tl.step(kind, at) for kind, at in steps], [AT_RISK, MISSED, AS_OF])
        expected: list[tuple[str, str, datetime]] = []
        assert expected == window(alerts)


class TestEnrollmentAfterStart:
    """An enrolment read after the second-line start (cross-topic order) still fires the window at its deadlines."""

    @pytest.mark.parametrize(
        ("before_enrolment", "expected"),
        [
            pytest.param([], NO_FRACTION, id="right-after-start"),
            pytest.param([("lab", "2025-03-13T09:00:00+08:00")], NO_FRACTION, id="clock-past-at-risk"),
            pytest.param([("lab", "2025-03-20T09:00:00+08:00")], NO_FRACTION, id="clock-past-missed"),
            pytest.param([("fraction", "2025-03-05T09:00:00+08:00")], [], id="fraction-in-time-read-before-enrolment"),
            # A fraction after the window says nothing about the window: the same alerts as with no fraction
            # (and as when the enrolment is read first, see TestFirstFractionBoundary "day-15-morning-missed").
            pytest.param(
                [("fraction", "2025-03-17T09:00:00+08:00"), ("lab", "2025-03-20T09:00:00+08:00")],
                NO_FRACTION,
                id="fraction-after-window-read-before-enrolment",
            ),
        ],
    )
    def test_replay(
        self,
        engine: Engine,
        tl: Timeline,
        before_enrolment: list[tuple[str, str]],
        expected: list[tuple[str, str, datetime]],
    ) -> None:
        events = [tl.start(), *(tl.step(kind, at) for kind, at in before_enrolment), tl.enrollment()]
        alerts = replay_all(engine, events)
        assert expected == window(alerts)

    @pytest.mark.parametrize(
        "enrolment_read_at",
        [
            pytest.param("2025-03-05T09:00:00+08:00", id="before-at-risk"),
            pytest.param("2025-03-13T09:00:00+08:00", id="after-at-risk"),
            pytest.param("2025-03-20T09:00:00+08:00", id="after-missed"),
        ],
    )
    def test_engine_ticks(self, engine: Engine, tl: Timeline, enrolment_read_at: str) -> None:
        """The live service: ticks come from `next_deadline_at`, which the enrolment sets."""
        direct = Direct(engine)
        direct.event(tl.start())
        direct.tick(enrolment_read_at)  # the wall clock moves on; no arm is known yet
        alerts = direct.event(tl.enrollment())
        while direct.next_deadline_at is not None and direct.next_deadline_at <= ts(AS_OF):
            alerts += direct.tick(direct.next_deadline_at)
        assert NO_FRACTION == window(alerts)


# (steps, next_deadline_at after each step) for the reference start.
NEXT_DEADLINE_CASES = [
    pytest.param(
        [
            ("enrol_sbrt", ENROLLED, None),
            ("start", START, AT_RISK),
            ("tick", (ts(AT_RISK) - SECOND).isoformat(), AT_RISK),
            ("tick", AT_RISK, MISSED),
            ("tick", (ts(MISSED) - SECOND).isoformat(), MISSED),
            ("tick", MISSED, None),
            ("tick", AS_OF, None),
        ],
        id="no-fraction",
    ),
    pytest.param(
        [("enrol_sbrt", ENROLLED, None), ("start", START, AT_RISK), ("fraction", "2025-03-05T09:00:00+08:00", None)],
        id="fraction-before-at-risk",
    ),
    pytest.param(
        [
            ("enrol_sbrt", ENROLLED, None),
            ("start", START, AT_RISK),
            ("tick", AT_RISK, MISSED),
            ("fraction", "2025-03-13T09:00:00+08:00", None),
            ("tick", MISSED, None),
        ],
        id="fraction-in-at-risk-period",
    ),
    pytest.param(
        [
            ("enrol_sbrt", ENROLLED, None),
            ("start", START, AT_RISK),
            ("tick", AT_RISK, MISSED),
            ("tick", MISSED, None),
            ("fraction", "2025-03-14T09:00:00+08:00", None),
        ],
        id="late-fraction-after-missed",
    ),
    pytest.param(
        [("start", START, None), ("enrol_sbrt", ENROLLED, AT_RISK), ("tick", AT_RISK, MISSED), ("tick", MISSED, None)],
        id="enrolled-after-start",
    ),
    pytest.param(
        [("enrol_control", ENROLLED, None), ("start", START, None), ("tick", AT_RISK, None), ("tick", MISSED, None)],
        id="control-arm",
    ),
    pytest.param(
        [
            ("enrol_sbrt", ENROLLED, None),
            ("start", "2025-03-01T23:30:00-05:00", "2025-03-12T00:00:00-05:00"),
            ("tick", "2025-03-12T00:00:00-05:00", "2025-03-16T00:00:00-05:00"),
            ("tick", "2025-03-16T00:00:00-05:00", None),
        ],
        id="start-in-minus5",
    ),
    pytest.param(
        [
            ("start", START, None),
            ("fraction", "2025-03-17T09:00:00+08:00", None),
            ("enrol_sbrt", ENROLLED, AT_RISK),
            ("tick", AT_RISK, MISSED),
            ("tick", MISSED, None),
        ],
        id="fraction-after-window-read-before-enrolment",
    ),
]


class TestNextDeadline:
    """`next_deadline_at` is the at-risk deadline, then the missed deadline, then None once the window is decided."""

    @pytest.mark.parametrize("steps", NEXT_DEADLINE_CASES)
    def test_next_deadline(self, engine: Engine, tl: Timeline, steps: list[tuple[str, str, str | None]]) -> None:
        direct = Direct(engine)
        actual = []
        for kind, at, _ in steps:
            if kind == "tick":
                direct.tick(at)
            else:
                direct.event(tl.step(kind, at))
            actual.append(direct.next_deadline_at)
        expected = [ts(deadline) if deadline else None for _, _, deadline in steps]
        assert expected == actual


# --------------------------------------------------------------------------- 3. deviations

# (events after a control-arm enrolment and the start, the crossover fraction's time or None)
CROSSOVER_CASES = [
    pytest.param([("fraction", "2025-03-10T09:00:00+08:00")], "2025-03-10T09:00:00+08:00", id="fraction-no-withdrawal"),
    pytest.param(
        [("withdrawal", "2025-03-05T09:00:00+08:00", "progression"), ("fraction", "2025-03-10T09:00:00+08:00")],
        None,
        id="withdrawal-for-progression-before",
    ),
    pytest.param(
        [("withdrawal", "2025-03-05T09:00:00+08:00", "toxicity"), ("fraction", "2025-03-10T09:00:00+08:00")],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-for-toxicity-before",
    ),
    pytest.param(
        [("withdrawal", "2025-03-05T09:00:00+08:00", "consent_withdrawn"), ("fraction", "2025-03-10T09:00:00+08:00")],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-consent-before",
    ),
    pytest.param(
        [("withdrawal", "2025-03-05T09:00:00+08:00", "other"), ("fraction", "2025-03-10T09:00:00+08:00")],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-other-before",
    ),
    pytest.param(
        [("fraction", "2025-03-10T09:00:00+08:00"), ("withdrawal", "2025-03-12T09:00:00+08:00", "progression")],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-for-progression-after",
    ),
    pytest.param(
        [
            ("fraction", "2025-03-10T09:00:00+08:00", 1),
            ("withdrawal", "2025-03-12T09:00:00+08:00", "progression"),
            ("fraction", "2025-03-14T09:00:00+08:00", 2),
        ],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-for-progression-between-fractions",
    ),
    pytest.param(
        [
            ("withdrawal", "2025-03-05T09:00:00+08:00", "progression"),
            ("fraction", "2025-03-10T09:00:00+08:00", 1),
            ("fraction", "2025-03-11T09:00:00+08:00", 2),
        ],
        None,
        id="withdrawal-for-progression-before-all-fractions",
    ),
    pytest.param(
        [
            ("withdrawal", "2025-03-05T09:00:00+08:00", "toxicity"),
            ("withdrawal", "2025-03-08T09:00:00+08:00", "progression"),
            ("fraction", "2025-03-10T09:00:00+08:00"),
        ],
        None,
        id="toxicity-then-progression-before",
    ),
    pytest.param(
        # An instant in another offset: 2025-03-10T00:30Z is 08:30+08:00, before the fraction at 09:00+08:00.
        [("withdrawal", "2025-03-10T00:30:00+00:00", "progression"), ("fraction", "2025-03-10T09:00:00+08:00")],
        None,
        id="withdrawal-for-progression-before-other-offset",
    ),
    pytest.param(
        # 2025-03-10T01:30Z is 09:30+08:00: after the fraction, though its UTC date-time reads earlier.
        [("fraction", "2025-03-10T09:00:00+08:00"), ("withdrawal", "2025-03-10T01:30:00+00:00", "progression")],
        "2025-03-10T09:00:00+08:00",
        id="withdrawal-for-progression-after-other-offset",
    ),
    pytest.param([("withdrawal", "2025-03-05T09:00:00+08:00", "progression")], None, id="withdrawal-no-fraction"),
    pytest.param([], None, id="nothing"),
    pytest.param(
        [("fraction", "2025-03-10T09:00:00+08:00", 1), ("fraction", "2025-03-11T09:00:00+08:00", 2)],
        "2025-03-10T09:00:00+08:00",
        id="two-fractions-one-alert",
    ),
]


class TestCrossover:
    """Control arm: an SBRT fraction with no earlier withdrawal for progression fires `protocol.crossover`, once."""

    @pytest.mark.parametrize(("steps", "crossover_at"), CROSSOVER_CASES)
    def test_control_arm(
        self, run: EngineRun, tl: Timeline, steps: list[tuple[Any, ...]], crossover_at: str | None
    ) -> None:
        events = [tl.enrollment(arm="control"), tl.start(), *(tl.step(*step) for step in steps)]
        alerts = of_rule(run.apply_all(events), "protocol.crossover")
        expected = [("firing", "warning", ts(crossover_at))] if crossover_at else []
        assert expected == [(a.status, a.severity, a.occurred_at) for a in alerts]

    @pytest.mark.parametrize(("steps", "crossover_at"), CROSSOVER_CASES)
    def test_never_for_sbrt_arm(
        self, run: EngineRun, tl: Timeline, steps: list[tuple[Any, ...]], crossover_at: str | None
    ) -> None:
        events = [tl.enrollment(arm="sbrt"), tl.start(), *(tl.step(*step) for step in steps)]
        expected: list[AlertMessage] = []
        assert expected == of_rule(run.apply_all(events), "protocol.crossover")

    def test_enrolment_read_after_the_fraction(self, run: EngineRun, tl: Timeline) -> None:
        events = [tl.start(), tl.fraction("2025-03-10T09:00:00+08:00"), tl.enrollment(arm="control")]
        expected = [("firing", "control")]
        assert expected == [(a.status, a.arm) for a in of_rule(run.apply_all(events), "protocol.crossover")]


# SBRT course: first fraction 2025-03-10 09:00, completed 2025-03-14 17:00 (+08:00).
COURSE = [
    ("fraction", "2025-03-10T09:00:00+08:00", 1),
    ("fraction", "2025-03-12T09:00:00+08:00", 2),
    ("completed", "2025-03-14T17:00:00+08:00"),
]

# (treatment steps, in arrival order; fires)
SYSTEMIC_HELD_CASES = [
    pytest.param([*COURSE[:2], ("held", "2025-03-11T09:00:00+08:00"), COURSE[2]], True, id="held-during-course"),
    pytest.param(
        [*COURSE[:2], ("held", "2025-03-11T09:00:00+08:00"), ("resumed", "2025-03-13T09:00:00+08:00"), COURSE[2]],
        True,
        id="held-and-resumed-during-course",
    ),
    pytest.param([*COURSE[:2], ("held", "2025-03-13T09:00:00+08:00")], True, id="held-during-course-not-completed-yet"),
    pytest.param(
        [*COURSE, ("held", "2025-03-11T09:00:00+08:00")], True, id="held-during-course-reported-after-completion"
    ),
    pytest.param(
        [("held", "2025-03-05T09:00:00+08:00"), ("resumed", "2025-03-08T09:00:00+08:00"), *COURSE],
        False,
        id="held-before-resumed-before-first-fraction",
    ),
    pytest.param(
        [("held", "2025-03-05T09:00:00+08:00"), *COURSE[:1], ("resumed", "2025-03-11T09:00:00+08:00"), *COURSE[1:]],
        True,
        id="held-before-resumed-after-first-fraction",
    ),
    pytest.param([("held", "2025-03-05T09:00:00+08:00"), *COURSE], True, id="held-before-never-resumed"),
    pytest.param(
        [("held", "2025-03-05T09:00:00+08:00"), ("resumed", "2025-03-10T02:00:00+00:00"), *COURSE],
        True,
        id="held-before-resumed-after-first-fraction-other-offset",
    ),
    pytest.param(
        [("held", "2025-03-05T09:00:00+08:00"), ("resumed", "2025-03-09T23:00:00+08:00"), *COURSE],
        False,
        id="held-before-resumed-evening-before",
    ),
    pytest.param([*COURSE, ("held", "2025-03-16T09:00:00+08:00")], False, id="held-after-completion"),
    pytest.param(
        [*COURSE, ("held", "2025-03-16T09:00:00+08:00"), ("resumed", "2025-03-18T09:00:00+08:00")],
        False,
        id="held-and-resumed-after-completion",
    ),
    pytest.param(
        [
            ("held", "2025-03-05T09:00:00+08:00"),
            ("resumed", "2025-03-08T09:00:00+08:00"),
            *COURSE,
            ("held", "2025-03-16T09:00:00+08:00"),
        ],
        False,
        id="held-only-outside-course",
    ),
    pytest.param([("held", "2025-03-05T09:00:00+08:00")], False, id="held-no-sbrt"),
    pytest.param(COURSE, False, id="course-no-hold"),
    pytest.param(
        [*COURSE[:2], ("held", "2025-03-11T09:00:00+08:00"), ("held", "2025-03-13T09:00:00+08:00"), COURSE[2]],
        True,
        id="two-holds-one-alert",
    ),
]


class TestSystemicHeldDuringSbrt:
    """A systemic hold during the SBRT course, or one before it not resumed by the first fraction, fires once."""

    @pytest.mark.parametrize(("steps", "fires"), SYSTEMIC_HELD_CASES)
    def test_held(self, run: EngineRun, tl: Timeline, steps: list[tuple[Any, ...]], fires: bool) -> None:
        events = [tl.enrollment(arm="sbrt"), tl.start(), *(tl.step(*step) for step in steps)]
        alerts = of_rule(run.apply_all(events), "protocol.systemic_held_during_sbrt")
        expected = [("firing", "warning")] if fires else []
        assert expected == [(a.status, a.severity) for a in alerts]


# The stipulation exactly as the contract words it.
ALLOWED = {
    "atezolizumab+bevacizumab": {"lenvatinib", "regorafenib"},
    "sintilimab+bevacizumab": {"lenvatinib", "regorafenib"},
    "lenvatinib": {"regorafenib+pd1"},
    "lenvatinib+pd1": {"regorafenib+pd1"},
}
REGIMEN_PAIRS = [
    pytest.param(first, second, second not in ALLOWED[first], id=f"{first}->{second}")
    for first in ("atezolizumab+bevacizumab", "sintilimab+bevacizumab", "lenvatinib", "lenvatinib+pd1")
    for second in ("lenvatinib", "regorafenib", "regorafenib+pd1")
]


class TestRegimenMismatch:
    """`protocol.regimen_mismatch` fires exactly when the second-line regimen is not allowed after the first line."""

    def test_table_has_twelve_pairs_six_mismatching(self) -> None:
        expected = (12, 6)
        assert expected == (len(REGIMEN_PAIRS), sum(bool(p.values[2]) for p in REGIMEN_PAIRS))

    @pytest.mark.parametrize(("first_line", "second_line", "mismatch"), REGIMEN_PAIRS)
    @pytest.mark.parametrize("arm", ["sbrt", "control"])
    @pytest.mark.parametrize("order", ["enrolment-first", "start-first"])
    def test_pair(
        self,
        run: EngineRun,
        tl: Timeline,
        first_line: str,
        second_line: str,
        mismatch: bool,
        arm: str,
        order: str,
    ) -> None:
        enrollment = tl.enrollment(arm=arm, first_line=first_line)
        start = tl.start(regimen=second_line)
        events = [enrollment, start] if order == "enrolment-first" else [start, enrollment]
        alerts = of_rule(run.apply_all(events), "protocol.regimen_mismatch")
        expected = [("firing", "warning")] if mismatch else []
        assert expected == [(a.status, a.severity) for a in alerts]


class TestDeviationsOncePerSubjectAndRule:
    """A deviation alert is one per subject and rule: repeats and re-sent events add no message."""

    @pytest.mark.parametrize(
        ("rule", "arm", "first_line", "steps"),
        [
            pytest.param(
                "protocol.crossover",
                "control",
                "atezolizumab+bevacizumab",
                [("fraction", "2025-03-10T09:00:00+08:00", 1), ("fraction", "2025-03-11T09:00:00+08:00", 2)],
                id="crossover-more-fractions",
            ),
            pytest.param(
                "protocol.systemic_held_during_sbrt",
                "sbrt",
                "atezolizumab+bevacizumab",
                [
                    ("fraction", "2025-03-10T09:00:00+08:00", 1),
                    ("held", "2025-03-11T09:00:00+08:00"),
                    ("resumed", "2025-03-12T09:00:00+08:00"),
                    ("held", "2025-03-13T09:00:00+08:00"),
                    ("completed", "2025-03-14T09:00:00+08:00"),
                ],
                id="systemic-held-twice",
            ),
            pytest.param(
                "protocol.regimen_mismatch",
                "sbrt",
                "lenvatinib",
                [("fraction", "2025-03-10T09:00:00+08:00", 1), ("lab", "2025-03-20T09:00:00+08:00")],
                id="regimen-mismatch-later-events",
            ),
        ],
    )
    def test_once(
        self, engine: Engine, tl: Timeline, rule: str, arm: str, first_line: str, steps: list[tuple[Any, ...]]
    ) -> None:
        enrollment, start = tl.enrollment(arm=arm, first_line=first_line), tl.start()
        events = [enrollment, start, *(tl.step(*s) for s in steps)]
        # The same file twice over (every event re-sent), then the clock runs on.
        alerts = replay_all(engine, [*events, *events, tl.lab("2025-04-01T09:00:00+08:00")])
        expected = [("firing", 1)]
        assert expected == [(a.status, a.revision) for a in of_rule(alerts, rule)]


# --------------------------------------------------------------------------- 4. masking


def _scenario(tl: Timeline, name: str) -> list[InputEvent]:
    return {
        # at risk fires and is resolved by a fraction in the at-risk period
        "window-at-risk": [tl.enrollment(), tl.start(), tl.fraction("2025-03-13T09:00:00+08:00")],
        # at risk superseded, missed fires and is resolved by a late in-window fraction
        "window-missed": [
            tl.enrollment(),
            tl.start(),
            tl.lab("2025-03-20T09:00:00+08:00"),
            tl.fraction("2025-03-14T09:00:00+08:00"),
        ],
        "crossover": [tl.enrollment(arm="control"), tl.start(), tl.fraction("2025-03-10T09:00:00+08:00")],
        "systemic-held": [
            tl.enrollment(),
            tl.start(),
            tl.fraction("2025-03-05T09:00:00+08:00"),
            tl.held("2025-03-06T09:00:00+08:00"),
        ],
        "mismatch-sbrt": [tl.enrollment(arm="sbrt", first_line="lenvatinib"), tl.start(regimen="lenvatinib")],
        "mismatch-control": [tl.enrollment(arm="control", first_line="lenvatinib"), tl.start(regimen="regorafenib")],
    }[name]


class TestMasking:
    """`mask` drops every alert of these rules except `protocol.regimen_mismatch`, which does not reveal the arm."""

    @pytest.mark.parametrize(
        ("scenario", "rule", "statuses"),
        [
            pytest.param("window-at-risk", "sbrt.window.at_risk", ["firing", "resolved"], id="sbrt.window.at_risk"),
            pytest.param("window-missed", "sbrt.window.missed", ["firing", "resolved"], id="sbrt.window.missed"),
            pytest.param(
                "window-missed", "sbrt.window.at_risk", ["firing", "resolved"], id="sbrt.window.at_risk-superseded"
            ),
            pytest.param("crossover", "protocol.crossover", ["firing"], id="protocol.crossover"),
            pytest.param(
                "systemic-held", "protocol.systemic_held_during_sbrt", ["firing"], id="protocol.systemic_held"
            ),
        ],
    )
    def test_dropped(self, engine: Engine, tl: Timeline, scenario: str, rule: str, statuses: list[str]) -> None:
        alerts = of_rule(replay_all(engine, _scenario(tl, scenario)), rule)
        assert statuses == [a.status for a in alerts]
        expected = [None] * len(alerts)
        assert expected == [mask(a) for a in alerts]

    @pytest.mark.parametrize(
        ("scenario", "arm"),
        [
            pytest.param("mismatch-sbrt", "sbrt", id="sbrt-arm"),
            pytest.param("mismatch-control", "control", id="control-arm"),
        ],
    )
    def test_regimen_mismatch_kept_without_arm(self, engine: Engine, tl: Timeline, scenario: str, arm: str) -> None:
        alerts = of_rule(replay_all(engine, _scenario(tl, scenario)), "protocol.regimen_mismatch")
        expected_arms = [arm]
        assert expected_arms == [a.arm for a in alerts]
        masked = [mask(a) for a in alerts]
        identity = ("alert_id", "revision", "status", "severity", "occurred_at")
        expected = [tuple(getattr(a, k) for k in identity) for a in alerts]
        assert expected == [tuple(getattr(m, k) for k in identity) if m is not None else None for m in masked]
        # The regimens are the evidence a blinded reader needs; both arms get second-line therapy.
        assert [a.evidence["second_line_regimen"] for a in alerts] == [
            m.evidence["second_line_regimen"] for m in masked if m is not None
        ]

    @pytest.mark.parametrize(
        "scenario",
        ["window-at-risk", "window-missed", "crossover", "systemic-held", "mismatch-sbrt", "mismatch-control"],
    )
    def test_nothing_else_of_these_rules_survives(self, engine: Engine, tl: Timeline, scenario: str) -> None:
        alerts = replay_all(engine, _scenario(tl, scenario))
        survivors = {m.rule for m in (mask(a) for a in alerts if a.rule in (*WINDOW_RULES, *DEVIATION_RULES)) if m}
        expected = {"protocol.regimen_mismatch"} if scenario.startswith("mismatch") else set()
        assert expected == survivors
