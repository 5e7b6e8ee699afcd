"""`trialwatch replay --jobs N` prints byte for byte what `--jobs 1` prints.

The shards share nothing but the file: the event-time clock, the order of
deadlines across subjects and the arm-level monitor are rebuilt from the
timeline of valid lines. Each test compares the two runs' stdout and stderr
on a file built to stress one of those.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from trialwatch.cli import main
from trialwatch.cohort import generate
from trialwatch.demo import demo_cohort
from trialwatch.engine import Engine
from trialwatch.replay_parallel import owner

EST = timezone(timedelta(hours=-5))


def run(capsys: pytest.CaptureFixture[str], path: Path, *options: str) -> tuple[str, str]:
    assert main(["replay", str(path), *options]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def same_in_both(capsys: pytest.CaptureFixture[str], path: Path, *options: str) -> tuple[str, str]:
    sequential = run(capsys, path, "--jobs", "1", *options)
    for jobs in ("2", "3"):
        assert run(capsys, path, "--jobs", jobs, *options) == sequential, f"--jobs {jobs}"
    return sequential


def _other_offsets(lines: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The same instants written in other UTC offsets for some lines: the clock must keep each as written."""
    rng = random.Random(seed)
    for item in lines:
        if rng.random() < 0.2:
            at = datetime.fromisoformat(item["value"]["occurred_at"])
            item["value"]["occurred_at"] = at.astimezone(rng.choice([UTC, EST])).isoformat()
    return lines


def _hostile(lines: list[dict[str, Any]], seed: int) -> list[str]:
    """Re-sends, bad lines of every kind, and lines out of order, among the cohort's."""
    rng = random.Random(seed)
    out = [json.dumps(item) for item in lines]
    for i in range(0, len(out), 37):
        out.insert(i, rng.choice(['{"topic": "trial.labs.v1", "value": {"x": 1}}', "not json", "", "[1, 2]"]))
    for _ in range(len(out) // 20):
        out.insert(rng.randrange(len(out)), rng.choice(out))
    for i in range(0, len(out) - 1, 13):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def test_a_generated_cohort_with_odd_offsets_bad_lines_and_resends(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = _other_offsets(list(generate(60, seed=3, start=date(2025, 1, 1))), seed=3)
    path = tmp_path / "cohort.jsonl"
    path.write_text("\n".join(_hostile(lines, seed=3)) + "\n", encoding="utf-8")

    out, err = same_in_both(capsys, path, "--as-of", "2026-01-01T00:00:00+08:00")

    rules = {json.loads(line)["rule"] for line in out.splitlines()}
    assert {"sbrt.window.missed", "lab.platelets.low", "ae.grade3plus"} <= rules
    assert sum(1 for line in err.splitlines() if line.startswith("line ")) > 10
    assert any("-05:00" in json.loads(line)["raised_at"] or "Z" in line for line in out.splitlines())


def test_the_demo_cohort_masked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "demo.jsonl"
    path.write_text(demo_cohort(date(2026, 6, 1)), encoding="utf-8")

    out, _ = same_in_both(capsys, path, "--masked", "--as-of", "2026-07-01T00:00:00+08:00")

    assert len(out.splitlines()) > 5


def _window_subjects(n: int) -> list[str]:
    """SBRT subjects whose deadlines coincide, half of them on each of two shards."""
    names = [f"TW-TIE-{i:03d}" for i in range(200)]
    a = [s for s in names if owner(s, 2) == 0][: n // 2]
    b = [s for s in names if owner(s, 2) == 1][: n // 2]
    return sorted(a + b, reverse=True)


def test_deadlines_due_together_fire_in_the_sequential_order(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    start = datetime(2025, 3, 3, 9, 0, tzinfo=timezone(timedelta(hours=8)))
    lines = []
    for sid in _window_subjects(8):
        common = {"subject_id": sid, "site_id": "SITE-GZ"}
        lines.append(
            {
                "topic": "trial.enrollment.v1",
                "value": {
                    **common,
                    "event_id": f"{sid}-en",
                    "occurred_at": start.isoformat(),
                    "arm": "sbrt",
                    "first_line_regimen": "lenvatinib",
                    "age_years": 60,
                    "kps": 90,
                    "child_pugh_score": 6,
                },
            }
        )
        lines.append(
            {
                "topic": "trial.treatment.v1",
                "value": {
                    **common,
                    "event_id": f"{sid}-tx",
                    "occurred_at": start.isoformat(),
                    "kind": "second_line_start",
                    "regimen": "regorafenib+pd1",
                },
            }
        )
    # One later event of one subject makes every deadline due at once.
    late = {**lines[0]["value"], "event_id": "late", "occurred_at": (start + timedelta(days=30)).isoformat()}
    path = tmp_path / "ties.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [*lines, {"topic": "trial.enrollment.v1", "value": late}]))

    out, _ = same_in_both(capsys, path)

    fired = [json.loads(line) for line in out.splitlines()]
    # For each of the 8 subjects: at risk, then missed, which resolves the at-risk alert.
    assert len(fired) == 24
    assert {owner(a["subject_id"], 2) for a in fired} == {0, 1}


def test_an_engine_error_in_a_shard_is_reported_as_sequentially(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [json.dumps(x) for x in generate(20, seed=5, start=date(2025, 1, 1))]
    victims = {json.loads(lines[i])["value"]["event_id"] for i in (40, 400, 900)}
    real = Engine.apply

    def failing(self: Engine, state: object, event: object, now: datetime) -> object:
        if getattr(event, "event_id", None) in victims:
            raise ArithmeticError("a rule bug")
        return real(self, state, event, now)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "apply", failing)  # the shards are forked: they inherit it
    path = tmp_path / "cohort.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    _, err = same_in_both(capsys, path)

    assert 3 == sum("ArithmeticError in rule evaluation" in line for line in err.splitlines())


def test_a_line_whose_subject_is_not_where_it_looks_falls_back_to_one_process(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = list(generate(10, seed=9, start=date(2025, 1, 1)))
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    alerted = {json.loads(line)["subject_id"] for line in run(capsys, path, "--jobs", "1")[0].splitlines()}
    # The enrolment of a subject with alerts (they carry its arm) names, before its subject_id, a subject
    # of the other shard: the cheap look sends it there, which would split the subject's state.
    n = next(
        i for i, x in enumerate(lines) if x["topic"] == "trial.enrollment.v1" and x["value"]["subject_id"] in alerted
    )
    real = lines[n]["value"]["subject_id"]
    decoy = next(s for s in (f"TW-DECOY-{i}" for i in range(100)) if owner(s, 2) != owner(real, 2))
    lines[n] = {"topic": lines[n]["topic"], "value": {"extra": {"subject_id": decoy}, **lines[n]["value"]}}
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")

    out, _ = same_in_both(capsys, path)

    assert out
