"""`trialwatch replay`: the engine over an event file, on an event-time clock, bad lines on stderr."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from trialwatch.cli import main
from trialwatch.contract import AlertMessage, MaskedAlertMessage
from trialwatch.engine import Engine
from trialwatch.replay import Replay

if TYPE_CHECKING:
    from tests.unit.conftest import EventFactory
    from trialwatch.protocol import Protocol

CST = timezone(timedelta(hours=8))
AS_OF = "2025-04-01T00:00:00+08:00"
BAD_LINE = re.compile(r"^line (\d+): (\S+): (.+)$")


def write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def replay(capsys: pytest.CaptureFixture[str], path: str, *options: str) -> tuple[int, list[str], list[str]]:
    code = main(["replay", path, *options])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


@pytest.fixture
def mixed_file(make: EventFactory, tmp_path: Path) -> str:
    """Lines 1, 2, 5, 6 are valid; line 3 is not JSON; line 4 has a naive date-time."""
    naive = make.body("lab", value=10.0, day=1)
    naive["occurred_at"] = "2025-03-02T08:00:00"
    return write(
        tmp_path,
        [
            make.line("enrollment", arm="sbrt", event_id="enr-1"),
            make.line("lab", value=40.0, day=1, event_id="lab-1"),
            '{"topic": "trial.labs.v1", "value": {',
            json.dumps({"topic": "trial.labs.v1", "value": naive}),
            make.line("lab", value=20.0, day=2, event_id="lab-2"),
            make.line("ae", grade=3, serious=True, day=2, ae_id="AE-1", event_id="ae-1"),
        ],
    )


class TestBadLines:
    """A line that is not a valid event goes to stderr as `line N: reason: detail`; replay goes on and exits 0."""

    @pytest.mark.parametrize("options", [[], ["--masked"], ["--as-of", AS_OF], ["--masked", "--as-of", AS_OF]])
    def test_bad_lines_reported_good_lines_replayed(
        self, capsys: pytest.CaptureFixture[str], mixed_file: str, options: list[str]
    ) -> None:
        code, out, err = replay(capsys, mixed_file, *options)
        expected = 0
        assert expected == code
        matches = [BAD_LINE.match(line) for line in err]
        expected = [3, 4]
        assert expected == [int(m.group(1)) for m in matches if m is not None]
        assert len(err) == len([m for m in matches if m is not None])
        alerts = [json.loads(line) for line in out]
        expected = [
            ("lab.platelets.low", "high", 1),
            ("lab.platelets.low", "critical", 2),
        ]
        assert expected == [(a["rule"], a["severity"], a["revision"]) for a in alerts if a["rule"].startswith("lab.")]
        assert {"ae.grade3plus", "ae.serious"} == {a["rule"] for a in alerts if a["rule"].startswith("ae.")}

    def test_naive_datetime_reason_names_the_problem(self, capsys: pytest.CaptureFixture[str], mixed_file: str) -> None:
        _, _, err = replay(capsys, mixed_file)
        (line4,) = [line for line in err if line.startswith("line 4: ")]
        assert "naive" in line4 or "timezone" in line4

    def test_only_bad_lines(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        code, out, err = replay(capsys, write(tmp_path, ["nope", "[1, 2]", '{"topic": "trial.nope.v1", "value": {}}']))
        expected = (0, [], [1, 2, 3])
        assert expected == (code, out, [int(m.group(1)) for line in err if (m := BAD_LINE.match(line))])


class TestOutput:
    """Alert lines are JSON `AlertMessage`s (DSMB stream) or masked ones with no `arm` (`--masked`)."""

    def test_unmasked_lines_parse_as_alert_messages_with_arm(
        self, capsys: pytest.CaptureFixture[str], mixed_file: str
    ) -> None:
        _, out, _ = replay(capsys, mixed_file)
        alerts = [AlertMessage.model_validate_json(line) for line in out]
        expected = 4
        assert expected == len(alerts)
        assert {"sbrt"} == {a.arm for a in alerts}

    def test_masked_lines_have_no_arm(self, capsys: pytest.CaptureFixture[str], mixed_file: str) -> None:
        _, out, _ = replay(capsys, mixed_file, "--masked", "--as-of", AS_OF)
        expected = []
        assert expected == [line for line in out if '"arm"' in line]
        masked = [MaskedAlertMessage.model_validate_json(line) for line in out]
        expected = 4
        assert expected == len(masked)

    def test_masked_carries_the_same_alerts(self, capsys: pytest.CaptureFixture[str], mixed_file: str) -> None:
        _, unmasked, _ = replay(capsys, mixed_file)
        _, masked, _ = replay(capsys, mixed_file, "--masked")
        # The same alert states (the masked evidence and summary are an allow-listed projection: test_masking).
        identity = ("alert_id", "revision", "status", "rule", "severity", "occurred_at", "raised_at")
        expected = [tuple(json.loads(line)[k] for k in identity) for line in unmasked]
        assert expected == [tuple(json.loads(line)[k] for k in identity) for line in masked]

    def test_replay_is_deterministic(self, capsys: pytest.CaptureFixture[str], mixed_file: str) -> None:
        first = replay(capsys, mixed_file, "--as-of", AS_OF)
        second = replay(capsys, mixed_file, "--as-of", AS_OF)
        assert first == second


class TestResentLines:
    """A line whose event_id was replayed before adds nothing to the output."""

    def test_duplicate_lines(self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path) -> None:
        lines = [make.line("lab", value=40.0, day=1), make.line("ae", grade=4, serious=True, day=1)]
        _, once, _ = replay(capsys, write(tmp_path, lines))
        _, twice, _ = replay(capsys, write(tmp_path, lines + lines))
        expected = 3
        assert expected == len(once)
        assert once == twice


class TestEventTimeClock:
    """raised_at is the event-time clock, the latest occurred_at seen so far, never the wall clock."""

    def test_raised_at_is_the_latest_occurred_at(
        self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path
    ) -> None:
        path = write(
            tmp_path,
            [
                make.line(
                    "lab", analyte="total_bilirubin", value=10.0, unit="umol/L", occurred_at="2025-03-05T10:00:00+08:00"
                ),
                make.line("lab", analyte="platelets", value=40.0, occurred_at="2025-03-03T07:00:00+08:00"),
                make.line("ae", grade=3, occurred_at="2025-03-06T01:30:00+08:00"),
            ],
        )
        _, out, _ = replay(capsys, path, "--as-of", AS_OF)
        actual = [(a.rule, a.occurred_at, a.raised_at) for a in map(AlertMessage.model_validate_json, out)]
        expected = [
            (
                "lab.platelets.low",
                datetime(2025, 3, 3, 7, 0, tzinfo=CST),
                datetime(2025, 3, 5, 10, 0, tzinfo=CST),
            ),
            (
                "ae.grade3plus",
                datetime(2025, 3, 6, 1, 30, tzinfo=CST),
                datetime(2025, 3, 6, 1, 30, tzinfo=CST),
            ),
        ]
        assert expected == actual

    def test_replay_class_uses_the_same_clock(self, make: EventFactory, protocol: Protocol) -> None:
        replayer = Replay(Engine(protocol))
        expected = []
        assert expected == replayer.apply(make.lab(analyte="hemoglobin", value=130.0, unit="g/L", day=4))
        (alert,) = replayer.apply(make.lab(analyte="platelets", value=40.0, day=1))
        expected = (datetime(2025, 3, 2, 8, 0, tzinfo=CST), datetime(2025, 3, 5, 8, 0, tzinfo=CST))
        assert expected == (alert.occurred_at, alert.raised_at)


class TestReplayNeverDiesOnOneLine:
    """Issue 10, defects 3 and 11: a line of 50,000 nested arrays ended the whole replay with RecursionError,
    and an event the engine raised on ended it with a traceback. Each is now a reported line; replay goes on."""

    @pytest.mark.parametrize(
        "hostile",
        [
            '{"topic": "trial.labs.v1", "value": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "[" * 50_000,
            '{"topic": "trial.labs.v1", "value": {"v": "' + "x" * 200_000 + '"}}',
        ],
        ids=["nested-value", "nested-line", "oversize-line"],
    )
    def test_a_hostile_line_is_reported_and_the_rest_replayed(
        self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path, hostile: str
    ) -> None:
        path = write(tmp_path, [make.line("enrollment", arm="sbrt"), hostile, make.line("lab", value=20.0, day=1)])
        code, out, err = replay(capsys, path)
        assert (0, [2]) == (code, [int(m.group(1)) for line in err if (m := BAD_LINE.match(line))])
        assert ["lab.platelets.low"] == [json.loads(line)["rule"] for line in out]

    def test_a_repeated_key_in_the_value_is_refused_as_live(
        self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path
    ) -> None:
        line = make.line("lab", value=20.0, day=1).replace('"value": 20.0', '"value": 20.0, "value": 200.0')
        _, out, err = replay(capsys, write(tmp_path, [line]))
        assert [] == out
        assert ["duplicate_key"] == [m.group(2) for line in err if (m := BAD_LINE.match(line))]

    def test_an_engine_error_is_reported_with_its_line_and_replay_goes_on(
        self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = Engine.apply

        def failing_on_lab_1(self: Engine, state: object, event: object, now: datetime) -> object:
            if getattr(event, "event_id", None) == "lab-1":
                raise ArithmeticError("a rule bug")
            return real(self, state, event, now)  # type: ignore[arg-type]

        monkeypatch.setattr(Engine, "apply", failing_on_lab_1)
        path = write(
            tmp_path,
            [
                make.line("lab", value=20.0, day=1, event_id="lab-1", subject_id="TW-001"),
                make.line("lab", value=20.0, day=2, event_id="lab-2", subject_id="TW-002"),
            ],
        )
        code, out, err = replay(capsys, path)
        assert 0 == code
        assert [(1, "processing_error")] == [
            (int(m.group(1)), m.group(2)) for line in err if (m := BAD_LINE.match(line))
        ]
        assert ["TW-002"] == [json.loads(line)["subject_id"] for line in out]


LAYOUTS = {
    "compact": lambda v: json.dumps({"topic": "trial.labs.v1", "value": v}, separators=(",", ":")),
    "value-first": lambda v: json.dumps({"value": v, "topic": "trial.labs.v1"}),
    "spaced": lambda v: '  {"topic": "trial.labs.v1", "value": ' + json.dumps(v, indent=1).replace("\n", " ") + "}  ",
}


class TestLineLayouts:
    """Replay validates a seed-style line's value text as sent; other layouts have it written again.
    Both must judge events as the worker would, whatever the line's spacing or key order."""

    @pytest.mark.parametrize("layout", sorted(LAYOUTS))
    def test_every_layout_gives_what_the_seed_layout_gives(
        self, capsys: pytest.CaptureFixture[str], make: EventFactory, tmp_path: Path, layout: str
    ) -> None:
        values = [
            make.body("lab", value=20.0, day=1),
            {**make.body("lab", day=2), "value": "20"},  # a string where a number belongs
            {**make.body("lab", day=3), "note": 'caf\u00e9 "q"', "value": 160.0},  # resolves
            {**make.body("lab", day=4), "value": 15.0, "unit": "g/L"},  # a unit that does not fit
        ]
        enrol = make.line("enrollment", arm="sbrt")

        def run(lines: list[str]) -> tuple[list[str], list[str]]:
            _, out, err = replay(capsys, write(tmp_path, [enrol, *lines]))
            return out, err

        seed = run([json.dumps({"topic": "trial.labs.v1", "value": v}) for v in values])
        other = run([LAYOUTS[layout](v) for v in values])

        assert ["wrong_type", "unit_mismatch"] == [m.group(2) for line in seed[1] if (m := BAD_LINE.match(line))]
        assert [20.0, 160.0] == [json.loads(line)["evidence"]["value"] for line in seed[0]]
        assert seed == other
