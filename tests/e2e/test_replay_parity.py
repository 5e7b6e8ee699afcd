"""`trialwatch replay` is the oracle of the live service: the same file gives the same alerts."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

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
    """Replay and the live worker produce the same alert ids, rules, severities, statuses and revisions."""

    async def test_same_file_same_alerts(
        self, bootstrap: str, worker_factory: Any, subject_prefix: str, tmp_path: Path
    ) -> None:
        lines = _normalise(event_file(subject_prefix))
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

        replayed = [
            json.loads(out)
            for out in subprocess.run(
                [TRIALWATCH, "replay", str(path)], check=True, capture_output=True, text=True
            ).stdout.splitlines()
        ]
        worker_factory().start()
        published = subprocess.run(
            [TRIALWATCH, "publish", str(path)],
            env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PATH": ""},
            capture_output=True,
            text=True,
        )
        assert 0 == published.returncode, published.stderr

        live = await read_topic(
            bootstrap,
            "trial.alerts.v1",
            lambda v: str(v.get("subject_id", "")).startswith(subject_prefix),
            lambda found: len(found) >= len(replayed),
            settle_s=3.0,
        )

        expected = lifecycles(replayed)
        assert expected == lifecycles(live)
        # The file exercises every v1 rule and every status, so the comparison means something.
        assert {"lab.platelets.low", "lab.bilirubin.high", "ae.grade3plus", "ae.serious"} == {
            a["rule"] for a in replayed
        }
        assert {"firing", "resolved"} == {a["status"] for a in replayed}
        assert max(a["revision"] for a in replayed) >= 3
