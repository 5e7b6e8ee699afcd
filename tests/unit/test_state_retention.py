"""Issue 11: a subject's state stays small whatever its history, and forgets nothing a rule still reads.

Three yardsticks: the bounded engine raises exactly the alerts of the same
engine with its horizons removed (long histories with corrections,
cancellations, resends and late results inside the horizon); the record of
a 20,000-event subject stays under 64 kB; and a state written by main
before the change (format 0, `fixtures/state_v0.jsonl`) is read with every
open alert and deadline, giving the alerts the old engine gave.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.conftest import CST
from trialwatch.contract import ADVERSE_EVENTS, ENROLLMENT, LABS, TREATMENT, AlertMessage, InputEvent
from trialwatch.decode import Rejection, decode
from trialwatch.engine import Engine, Tick, retention
from trialwatch.engine.state import FORMAT_1, decode_header, decode_state, encode_state
from trialwatch.metrics import Metrics
from trialwatch.protocol import Protocol
from trialwatch.replay import Replay
from trialwatch.units import PLAUSIBLE

FIXTURE = Path(__file__).with_name("fixtures") / "state_v0.jsonl"
T0 = datetime(2024, 1, 1, 8, 0, tzinfo=CST)
ANALYTES = [
    ("platelets", "10*9/L", 180.0, 40.0),
    ("neutrophils", "10*9/L", 3.2, 0.8),
    ("hemoglobin", "g/L", 130.0, 25.0),
    ("total_bilirubin", "umol/L", 14.0, 25.0),
    ("alt", "U/L", 35.0, 70.0),
    ("alp", "U/L", 100.0, 160.0),
    ("creatinine", "umol/L", 75.0, 40.0),
]


def event(topic: str, subject: str, event_id: str, at: datetime, **fields: Any) -> InputEvent:
    body = {"event_id": event_id, "subject_id": subject, "site_id": "SITE-GZ", "occurred_at": at.isoformat(), **fields}
    result = decode(topic, json.dumps(body).encode())
    if isinstance(result, Rejection):
        raise AssertionError(f"invalid test event {body}: {result.detail}")
    return result


def enrolment(subject: str, arm: str, at: datetime = T0) -> InputEvent:
    return event(
        ENROLLMENT,
        subject,
        f"{subject}-en",
        at,
        arm=arm,
        first_line_regimen="lenvatinib",
        age_years=60,
        kps=90,
        child_pugh_score=6,
    )


def lab(subject: str, event_id: str, at: datetime, analyte: str, value: float, **fields: Any) -> InputEvent:
    unit = next(u for a, u, _, _ in ANALYTES if a == analyte)
    return event(LABS, subject, event_id, at, analyte=analyte, value=value, unit=unit, **fields)


def long_history(subject: str, arm: str, n: int, seed: int) -> list[InputEvent]:
    """One subject's years: labs every 8 hours (some late), AEs and their updates, and within the
    horizon: corrections and cancellations of recent results and re-sent recent events."""
    rng = random.Random(seed)
    events = [enrolment(subject, arm)]
    events.append(
        event(
            TREATMENT, subject, f"{subject}-tx", T0 + timedelta(days=1), kind="second_line_start", regimen="lenvatinib"
        )
    )
    if arm == "sbrt":
        for f in range(5):
            at = T0 + timedelta(days=8 + f)
            events.append(
                event(TREATMENT, subject, f"{subject}-fx{f}", at, kind="sbrt_fraction", fraction=f + 1, dose_gy=8.0)
            )
    recent: list[dict[str, Any]] = []
    for i in range(n):
        at = T0 + timedelta(days=2, hours=8 * i)
        r = rng.random()
        if r < 0.05:
            grade = rng.choice([1, 2, 3, 3, 4])
            events.append(
                event(
                    ADVERSE_EVENTS,
                    subject,
                    f"{subject}-ae{i}",
                    at,
                    ae_id=f"{subject}-AE{i // 20}",
                    term="Fatigue",
                    grade=grade,
                    serious=grade >= 3 and rng.random() < 0.2,
                    attribution=rng.choice(["possible", "unrelated", "definite"]),
                )
            )
        elif r < 0.10 and recent:
            source = rng.choice(recent[-40:])
            if rng.random() < 0.3:
                events.append(lab(subject, f"{source['result_id']}-x{i}", **source, status="cancelled"))
            else:
                ceiling = float(PLAUSIBLE[source["analyte"]].value_max)
                value = min(ceiling, round(source["value"] * rng.choice([0.1, 0.5, 2.0, 4.0, 8.0]), 2))
                events.append(
                    lab(subject, f"{source['result_id']}-c{i}", **{**source, "value": value}, status="corrected")
                )
        elif r < 0.13:
            events.append(events[-rng.randint(1, min(60, len(events)))])  # a recent re-send
        else:
            analyte, _, mean, sd = ANALYTES[i % len(ANALYTES)]
            fields = {
                "at": at - timedelta(days=rng.choice([0, 0, 0, 0, 3, 10])),  # some late
                "analyte": analyte,
                "value": max(0.5, round(rng.gauss(mean, sd), 1)),
                "result_id": f"{subject}-R{i}",
            }
            events.append(lab(subject, f"{subject}-lab{i}", **fields))
            recent.append(fields)
    return events


def _unbounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same engine with every retention horizon removed: the full-history reference."""
    for name in (
        "SEEN_EVENT_IDS",
        "RESULTS_KEPT",
        "RESULTS_MAX",
        "PINNED_MAX",
        "ADVERSE_EVENTS_KEPT",
        "COUNTED_KEPT",
        "TREATMENTS_KEPT",
        "SCANS_KEPT",
        "EPISODES_KEPT",
    ):
        monkeypatch.setattr(retention, name, 10**9)


def _replay(protocol: Protocol, events: list[InputEvent]) -> tuple[list[str], Replay]:
    replay = Replay(Engine(protocol))
    out = [a.model_dump_json() for e in events for a in replay.apply(e)]
    return out, replay


def test_bounded_state_raises_the_alerts_of_the_full_history(
    protocol: Protocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [e for n, arm in enumerate(("sbrt", "control", "sbrt")) for e in long_history(f"L-{n}", arm, 1_500, n)]
    bounded, bounded_run = _replay(protocol, events)
    with monkeypatch.context() as patch:
        _unbounded(patch)
        full, full_run = _replay(protocol, events)

    assert len(full) > 100  # the histories do raise alerts (labs, AEs, RILD)
    assert bounded == full
    # And the bounded run did forget: its states are several times smaller.
    for sid, state in bounded_run.states.items():
        assert len(encode_state(state)) * 3 < len(encode_state(full_run.states[sid]))


@pytest.mark.parametrize("step_hours", [12, 1], ids=["outpatient", "inpatient-hourly-labs"])
def test_the_record_of_a_20000_event_subject_stays_under_64_kB(protocol: Protocol, step_hours: int) -> None:
    """Eleven-ish analytes, 90 % labs, 10 % AEs and their updates; hourly labs keep the most recent results."""
    engine = Engine(protocol)
    state, _ = engine.apply(None, enrolment("S-20K", "sbrt"), T0)
    start = event(TREATMENT, "S-20K", "tx", T0 + timedelta(days=1), kind="second_line_start", regimen="lenvatinib")
    state, _ = engine.apply(state, start, T0)
    sizes = []
    for i in range(20_000):
        at = T0 + timedelta(days=2, hours=step_hours * i)
        if i % 10 == 9:
            k, update = divmod(i // 10, 2)
            fields = {"ae_id": f"AE-{k}", "term": "Fatigue", "grade": 1 if update else 1 + k % 3}
            e = event(ADVERSE_EVENTS, "S-20K", f"ae-{i}", at, serious=False, attribution="possible", **fields)
        else:
            analyte, _, mean, _ = ANALYTES[i % len(ANALYTES)]
            e = lab("S-20K", f"lab-{i}", at, analyte, mean)
        state, _ = engine.apply(state, e, at)
        if i % 1_000 == 999:
            sizes.append(len(encode_state(state)))

    assert max(sizes) < 64 * 1024
    # Bounded, not merely slow-growing: the last 10,000 events add nothing.
    assert sizes[-1] <= sizes[9] * 1.05
    assert state.labs["platelets"].forgotten_through is not None


def test_a_baseline_is_kept_under_years_of_later_results(protocol: Protocol) -> None:
    engine = Engine(protocol)
    events = [
        enrolment("S-BL", "control"),
        lab("S-BL", "baseline-alt", T0 + timedelta(hours=1), "alt", 30.0),
        event(TREATMENT, "S-BL", "tx", T0 + timedelta(days=1), kind="second_line_start", regimen="lenvatinib"),
    ]
    events += [lab("S-BL", f"alt-{i}", T0 + timedelta(days=2 + 3 * i), "alt", 30.0) for i in range(500)]
    # ALT 6x ULN: CTCAE grade 3 for a normal baseline; the evidence names the baseline result.
    events.append(lab("S-BL", "alt-high", T0 + timedelta(days=1600), "alt", 300.0))
    state = None
    alerts: list[AlertMessage] = []
    for e in events:
        state, out = engine.apply(state, e, e.occurred_at)
        alerts += out

    [alert] = [a for a in alerts if a.rule == "lab.ctcae.grade3plus"]
    assert ("baseline-alt", 3) == (alert.evidence["baseline"]["event_id"], alert.ctcae_grade)
    assert state is not None
    assert len(state.labs["alt"].results) < 40


def test_the_rild_window_is_kept_when_later_results_push_it_out(protocol: Protocol) -> None:
    """Two high ALP results in the window, hundreds after it; cancelling the later one leaves the earlier."""
    engine = Engine(protocol)
    first_fraction = T0 + timedelta(days=8)
    events = [
        enrolment("S-RILD", "sbrt"),
        event(TREATMENT, "S-RILD", "tx", T0 + timedelta(days=1), kind="second_line_start", regimen="lenvatinib"),
        event(TREATMENT, "S-RILD", "fx1", first_fraction, kind="sbrt_fraction", fraction=1, dose_gy=8.0),
        lab("S-RILD", "alp-a", first_fraction + timedelta(days=30), "alp", 400.0, result_id="A"),
        lab("S-RILD", "alp-b", first_fraction + timedelta(days=40), "alp", 420.0, result_id="B"),
    ]
    events += [lab("S-RILD", f"alp-{i}", first_fraction + timedelta(days=100 + i), "alp", 90.0) for i in range(300)]
    events.append(
        lab("S-RILD", "alp-b-x", first_fraction + timedelta(days=40), "alp", 420.0, result_id="B", status="cancelled")
    )
    state = None
    rild: list[AlertMessage] = []
    for e in events:
        state, out = engine.apply(state, e, e.occurred_at)
        rild += [a for a in out if a.rule == "rild.suspected"]

    # Opened once; cancelling B leaves A, still above 2 x ULN in the window: not resolved.
    assert ["firing"] == [a.status for a in rild]


def test_a_re_sent_event_is_recognised_past_the_recent_ids(protocol: Protocol) -> None:
    """A preliminary re-sent after its correction and 600 other events does not undo the correction."""
    engine = Engine(protocol)
    at = T0 + timedelta(days=2)
    preliminary = lab("S-DUP", "plt-prelim", at, "platelets", 20.0, result_id="P", status="preliminary")
    corrected = lab("S-DUP", "plt-corr", at, "platelets", 180.0, result_id="P", status="corrected")
    events = [enrolment("S-DUP", "control"), preliminary, corrected]
    events += [lab("S-DUP", f"hb-{i}", at + timedelta(hours=i), "hemoglobin", 130.0) for i in range(600)]
    state = None
    for e in events:
        state, _ = engine.apply(state, e, e.occurred_at)
    assert state is not None
    n = retention.FINGERPRINT_BYTES
    recent = {state.seen[i : i + n] for i in range(0, len(state.seen), n)}
    assert (len(recent), retention.fingerprint("plt-prelim") in recent) == (retention.SEEN_EVENT_IDS, False)

    state, resent = engine.apply(state, preliminary, at + timedelta(days=40))
    state, resent_current = engine.apply(state, corrected, at + timedelta(days=40))
    state, resent_recent = engine.apply(state, events[-1], at + timedelta(days=40))

    assert ([], [], []) == (resent, resent_current, resent_recent)
    [platelets] = state.labs["platelets"].results
    assert (float(platelets.value), platelets.event_id) == (180.0, "plt-corr")


def test_ids_past_the_horizon_and_no_longer_current_are_applied_again(protocol: Protocol) -> None:
    """The documented limit: an AE update re-sent after SEEN_EVENT_IDS newer events, when a later update
    replaced it, is judged again by its recorded time (older: superseded, nothing changes)."""
    engine = Engine(protocol)
    at = T0 + timedelta(days=2)
    first = event(
        ADVERSE_EVENTS, "S-H", "ae-1", at, ae_id="AE", term="Fatigue", grade=3, serious=False, attribution="possible"
    )
    later = event(
        ADVERSE_EVENTS,
        "S-H",
        "ae-2",
        at + timedelta(days=1),
        ae_id="AE",
        term="Fatigue",
        grade=1,
        serious=False,
        attribution="possible",
    )
    events = [enrolment("S-H", "control"), first, later]
    events += [lab("S-H", f"hb-{i}", at + timedelta(hours=i), "hemoglobin", 130.0) for i in range(600)]
    state = None
    alerts: list[AlertMessage] = []
    for e in events:
        state, out = engine.apply(state, e, e.occurred_at)
        alerts += out
    assert ["firing", "resolved"] == [a.status for a in alerts if a.rule == "ae.grade3plus"]

    state, again = engine.apply(state, first, at + timedelta(days=40))

    assert [] == again
    assert state is not None
    assert "ae-2" == state.adverse_events["AE"].event_id


def _cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c['subject_id']}:{','.join(c['covers'])[:60]}")
def test_a_format_0_state_continues_as_the_old_engine_did(protocol: Protocol, case: dict[str, Any]) -> None:
    """A rolling upgrade: the new engine reads a state main wrote before issue 11 and raises the same alerts."""
    engine = Engine(protocol)
    old = json.loads(case["state"])
    state = decode_state(case["state"].encode())

    firing = {slot: rec for slot, rec in old["alerts"].items() if rec["status"] == "firing"}
    kept = {
        slot: [rec.alert_id, rec.revision, rec.severity, rec.support]
        for slot, rec in state.alerts.items()
        if rec.status == "firing"
    }
    assert kept == {s: [r["alert_id"], r["revision"], r["severity"], r["support"]] for s, r in firing.items()}
    old_deadline = old.get("next_deadline_at")
    assert state.next_deadline_at == (datetime.fromisoformat(old_deadline) if old_deadline else None)

    clock = datetime.fromisoformat(case["clock"])
    alerts = []
    for item in case["events"]:
        e = decode(item["topic"], json.dumps(item["value"]).encode())
        assert not isinstance(e, Rejection)
        clock = max(clock, e.occurred_at)
        state, out = engine.apply(state, e, clock)
        alerts += [a.model_dump(mode="json") for a in out]
    if case["tick_at"]:
        tick_at = datetime.fromisoformat(case["tick_at"])
        state, out = engine.apply(state, Tick(case["subject_id"], tick_at), max(clock, tick_at))
        alerts += [a.model_dump(mode="json") for a in out]

    assert alerts == case["alerts"]


def test_the_fixture_covers_what_an_upgrade_must_keep() -> None:
    covered = {feature for case in _cases() for feature in case["covers"]}
    wanted = {"deadline", "episodes", "firing:lab.platelets.low", "firing:ae.serious", "firing:rild.suspected"}
    assert wanted <= covered
    assert sum(len(case["alerts"]) for case in _cases()) >= 20


def test_the_header_is_read_without_the_state(protocol: Protocol) -> None:
    """Recovery reads only the header of each changelog record: a damaged body does not matter to it."""
    case = next(c for c in _cases() if c["tick_at"])
    state = decode_state(case["state"].encode())
    raw = encode_state(state)
    header_end = raw.index(b"\n")

    header = decode_header(raw[: header_end + 1] + b"not a state")

    assert raw.startswith(FORMAT_1)
    assert header.next_deadline_at == state.next_deadline_at is not None
    firing = [a.severity for a in state.alerts.values() if a.status == "firing"]
    assert header.open_alerts == {s: firing.count(s) for s in set(firing)}
    assert decode_state(raw) == state
    with pytest.raises(ValueError, match="unknown format"):
        decode_state(b"\x07whatever")


def test_a_format_0_state_is_bounded_before_its_next_event(protocol: Protocol) -> None:
    """A legacy state with years of results is cut to the horizon on its first event under the new engine."""
    shape = json.loads(_cases()[0]["state"])
    template = next(iter(shape["labs"].values()))
    labs = {
        f"R{i}": {**template, "at": (T0 + timedelta(days=i)).isoformat(), "seq": i, "event_id": f"e{i}"}
        for i in range(400)
    }
    legacy = json.dumps({**shape, "labs": labs, "seen_event_ids": [f"e{i}" for i in range(400)]}).encode()
    state = decode_state(legacy)
    analyte = template["analyte"]
    assert len(state.labs[analyte].results) == 400

    at = T0 + timedelta(days=500)
    state, _ = Engine(protocol).apply(state, lab(shape["subject_id"], "next", at, "hemoglobin", 130.0), at)

    # The recent ones, and those the baseline, RILD and screening windows pin (the case's treatment dates).
    pinned = sum(len(list(pin(state, analyte))) for pin in Engine(protocol).lab_pins)
    assert len(state.labs[analyte].results) <= retention.RESULTS_MAX + pinned < 400 / 4
    assert len(encode_state(state)) < len(legacy) / 5


async def test_a_worker_meeting_format_0_records_continues_them_and_writes_format_1(protocol: Protocol) -> None:
    """The rolling upgrade through the worker shell: the table holds old records, the worker keeps going."""
    from tests.unit.test_worker import FakeProducer
    from trialwatch.contract import ALERTS
    from trialwatch.worker import Record, SubjectWorker

    sent, expected = [], []
    for case in (c for c in _cases() if c["alerts"]):
        producer = FakeProducer()
        worker = SubjectWorker(Engine(protocol), Metrics(CollectorRegistry()), producer.send)
        key = case["subject_id"].encode()
        states = {key: case["state"].encode()}
        for offset, item in enumerate(case["events"]):
            await worker.handle(Record(item["topic"], 0, offset, key, json.dumps(item["value"]).encode()), states)
        assert states[key].startswith(FORMAT_1)
        sent += [json.loads(v) for topic, _, v in producer.sent if topic == ALERTS]
        # (A tick's alerts come from the wall clock here, not from the case's tick: left out.)
        expected += [a for a in case["alerts"] if a["rule"] not in ("sbrt.window.at_risk", "sbrt.window.missed")]

    fields = ("alert_id", "revision", "status", "rule", "severity", "evidence")
    assert [tuple(a[f] for f in fields) for a in sent] == [tuple(a[f] for f in fields) for a in expected]
    assert len(sent) >= 20
