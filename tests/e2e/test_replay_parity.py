"""`trialwatch replay` is the oracle of the live service: the same file gives the same alerts."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.catalogue import CATALOGUE
from tests.e2e.conftest import TRIALWATCH, adverse_event, enrollment, lab, read_topic

pytestmark = pytest.mark.e2e


def event_file(prefix: str) -> list[dict[str, Any]]:
    """Several subjects exercising every lifecycle path of the v1 lab and AE rules."""
    a, b, c = f"{prefix}-A", f"{prefix}-B", f"{prefix}-C"
    return [
        enrollment(a, "sbrt"),
        enrollment(b, "control"),
        # A: open, escalate, repeat (nothing), resolve, reopen as a new alert.
        lab(a, f"{a}-1", 45, at="2025-03-02T08:00:00+08:00"),
        lab(a, f"{a}-2", 24, at="2025-03-03T08:00:00+08:00"),
        lab(a, f"{a}-3", 30, at="2025-03-04T08:00:00+08:00"),
        lab(a, f"{a}-4", 160, at="2025-03-05T08:00:00+08:00"),
        lab(a, f"{a}-4", 160, at="2025-03-05T08:00:00+08:00"),  # re-sent event_id
        lab(a, f"{a}-5", 12, at="2025-03-09T08:00:00+08:00"),
        # A: an older normal result arriving late does not resolve the open alert.
        lab(a, f"{a}-6", 200, at="2025-03-08T08:00:00+08:00"),
        # B: bilirubin in mg/dL with the site's ULN, corrected down to normal.
        lab(b, f"{b}-1", 5.0, at="2025-03-02T09:00:00+08:00", analyte="total_bilirubin", unit_override="mg/dL"),
        lab(
            b,
            f"{b}-2",
            0.9,
            at="2025-03-02T09:00:00+08:00",
            analyte="total_bilirubin",
            unit_override="mg/dL",
            status="corrected",
            result_id=f"{b}-1",
        ),
        # B: a preliminary platelet count the lab then cancels.
        lab(b, f"{b}-3", 20, at="2025-03-06T09:00:00+08:00", status="preliminary", result_id=f"{b}-R3"),
        lab(b, f"{b}-4", 20, at="2025-03-06T09:00:00+08:00", status="cancelled", result_id=f"{b}-R3"),
        # C: no enrolment seen; AE escalates and becomes serious, then is downgraded.
        adverse_event(c, f"{c}-1", 3, False, at="2025-03-04T10:00:00+08:00", ae_id=f"{c}-AE1"),
        adverse_event(
            c,
            f"{c}-2",
            4,
            True,
            at="2025-03-04T10:00:00+08:00",
            ae_id=f"{c}-AE1",
            recorded_at="2025-03-05T10:00:00+08:00",
        ),
        adverse_event(
            c,
            f"{c}-3",
            2,
            False,
            at="2025-03-04T10:00:00+08:00",
            ae_id=f"{c}-AE1",
            recorded_at="2025-03-07T10:00:00+08:00",
        ),
        adverse_event(c, f"{c}-4", 5, True, at="2025-03-10T10:00:00+08:00"),
    ]


def _event(topic: str, subject: str, event_id: str, at: str, **fields: Any) -> dict[str, Any]:
    value = {"event_id": event_id, "subject_id": subject, "site_id": "SITE-E2E", "occurred_at": at, **fields}
    return {"topic": topic, "value": value}


def changed(line: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**line, "value": {**line["value"], **fields}}


def treatment(subject: str, event_id: str, at: str, kind: str, **fields: Any) -> dict[str, Any]:
    return _event("trial.treatment.v1", subject, event_id, at, kind=kind, **fields)


def scan(subject: str, scan_id: str, at: str, timepoint: str, diameter_mm: float) -> dict[str, Any]:
    lesion = {"lesion_id": "L1", "organ": "liver", "role": "target", "diameter_mm": diameter_mm}
    return _event(
        "trial.scans.v1", subject, scan_id, at, scan_id=scan_id, timepoint=timepoint, modality="CT", lesions=[lesion]
    )


def protocol_file(prefix: str) -> list[dict[str, Any]]:
    """One subject per remaining rule of the catalogue (every SBRT-arm subject gets its fraction in time)."""
    e, f, g, h, i, j, k = (f"{prefix}-{x}" for x in "EFGHIJK")
    day = "2025-04-{:02d}T09:00:00+08:00".format
    fraction = {"kind": "sbrt_fraction", "fraction": 1, "dose_gy": 8.0}
    return [
        # lab.ctcae.grade3plus: AST 12 x ULN (no SBRT: not RILD).
        lab(e, f"{e}-1", 480, at=day(2), analyte="ast", ref_high=40),
        # protocol.regimen_mismatch: lenvatinib first line allows only regorafenib+pd1.
        changed(enrollment(f, "control", at=day(1)), first_line_regimen="lenvatinib"),
        treatment(f, f"{f}-2L", day(3), "second_line_start", regimen="lenvatinib"),
        # protocol.crossover: a control-arm subject given SBRT.
        enrollment(g, "control", at=day(1)),
        treatment(g, f"{g}-2L", day(3), "second_line_start", regimen="lenvatinib"),
        treatment(g, f"{g}-F1", day(6), **fraction),
        # protocol.systemic_held_during_sbrt, and rild.suspected: ALP 3 x ULN a month after the first fraction.
        enrollment(h, "sbrt", at=day(1)),
        treatment(h, f"{h}-2L", day(3), "second_line_start", regimen="lenvatinib"),
        treatment(h, f"{h}-F1", day(7), **fraction),
        treatment(h, f"{h}-HOLD", day(8), "systemic_held"),
        treatment(h, f"{h}-DONE", day(11), "sbrt_completed"),
        lab(h, f"{h}-ALP", 360, at="2025-05-07T09:00:00+08:00", analyte="alp", ref_high=120),
        # recist.progression: the target lesion grows from 40 to 60 mm.
        scan(i, f"{i}-S0", day(2), "baseline", 40.0),
        scan(i, f"{i}-S1", "2025-06-02T09:00:00+08:00", "follow_up", 60.0),
        # eligibility.violation: Karnofsky 60 at enrolment.
        changed(enrollment(j, "control", at=day(1)), kps=60),
        # ae.grade3plus for an SBRT-arm subject with its fraction on time.
        enrollment(k, "sbrt", at=day(1)),
        treatment(k, f"{k}-2L", day(3), "second_line_start", regimen="regorafenib"),
        treatment(k, f"{k}-F1", day(9), **fraction),
        adverse_event(k, f"{k}-AE", 3, False, at=day(12)),
    ]


def window_closing(prefix: str, now: datetime) -> tuple[list[dict[str, Any]], datetime]:
    """An SBRT subject whose day-14 window ends a minute or two from `now`; at day 10 it is already at risk.

    Calendar days count in the UTC offset of the second-line start, so an
    offset is chosen that puts the end of day 14 on the next whole minute at
    least 45 s away: the live worker sees at-risk at once and the miss at its
    own time, as replay does.
    """
    missed_at = (now + timedelta(seconds=105)).replace(second=0, microsecond=0)
    minutes = missed_at.hour * 60 + missed_at.minute
    offset = timedelta(minutes=-minutes if minutes <= 12 * 60 else 24 * 60 - minutes)
    local_midnight = missed_at.astimezone(timezone(offset))
    start = (local_midnight - timedelta(days=14)).replace(hour=9) - timedelta(days=1)
    subject = f"{prefix}-L"
    return [
        enrollment(subject, "sbrt", at=(start - timedelta(days=2)).isoformat()),
        treatment(subject, f"{subject}-2L", start.isoformat(), "second_line_start", regimen="lenvatinib"),
    ], missed_at


def _normalise(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for line in lines:
        value = line["value"]
        unit = value.pop("unit_override", None)
        if unit is not None:
            value["unit"] = unit
            value["ref_high"] = 1.2
    return lines


def lifecycles(alerts: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
    """Per alert_id, its states in revision order, without the service-time stamp."""
    by_id: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for a in sorted(alerts, key=lambda a: (a["alert_id"], a["revision"])):
        by_id[a["alert_id"]].append((a["rule"], a["subject_id"], a["severity"], a["status"], a["revision"]))
    return dict(by_id)


class TestReplayMatchesLive:
    """Replay and the live worker produce the same alert ids, rules, severities, statuses and revisions.

    Every rule of the catalogue but the arm-level `dsmb.toxicity_boundary`,
    which counts every subject of an arm on the topics (this broker holds
    other tests' subjects too): tests/e2e/test_toxicity_monitor.py checks it
    live, and issue 13 makes its live order that of replay.
    """

    async def test_same_file_same_alerts(
        self, bootstrap: str, worker_factory: Any, subject_prefix: str, tmp_path: Path
    ) -> None:
        window, missed_at = window_closing(subject_prefix, datetime.now(UTC))
        lines = _normalise(event_file(subject_prefix) + protocol_file(subject_prefix) + window)
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

        replay = [TRIALWATCH, "replay", str(path), "--as-of", missed_at.isoformat()]
        replayed = [
            json.loads(out)
            for out in subprocess.run(replay, check=True, capture_output=True, text=True).stdout.splitlines()
        ]
        worker_factory().start()
        published = subprocess.run(
            [TRIALWATCH, "publish", str(path)],
            env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PATH": ""},
            capture_output=True,
            text=True,
        )
        assert 0 == published.returncode, published.stderr

        # The live worker judges the window on the wall clock: wait for the day-14 deadline to pass.
        live = await read_topic(
            bootstrap,
            "trial.alerts.v1",
            lambda v: str(v.get("subject_id", "")).startswith(subject_prefix),
            lambda found: len(found) >= len(replayed) and datetime.now(UTC) > missed_at + timedelta(seconds=3),
            timeout_s=(missed_at - datetime.now(UTC)).total_seconds() + 60,
            settle_s=3.0,
        )

        expected = lifecycles(replayed)
        assert expected == lifecycles(live)
        # The file exercises the catalogue and every status, so the comparison means something.
        assert CATALOGUE - {"dsmb.toxicity_boundary"} == {a["rule"] for a in replayed}
        assert {"firing", "resolved"} == {a["status"] for a in replayed}
        assert max(a["revision"] for a in replayed) >= 3
        window_rules = [
            (a["rule"], a["status"])
            for a in sorted(replayed, key=lambda a: a["raised_at"])
            if a["rule"].startswith("sbrt.")
        ]
        assert [
            ("sbrt.window.at_risk", "firing"),
            ("sbrt.window.at_risk", "resolved"),
            ("sbrt.window.missed", "firing"),
        ] == sorted(window_rules), "the clock-driven rules, both deadlines crossed"
