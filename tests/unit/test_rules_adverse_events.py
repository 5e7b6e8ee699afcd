"""Adverse-event rules of contract v1: `ae.grade3plus` and `ae.serious`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from trialwatch.contract import AlertMessage

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

Fired = tuple[str, str, int | None]  # rule, severity, ctcae_grade


def fired(alerts: list[AlertMessage]) -> list[Fired]:
    return [(a.rule, a.severity, a.ctcae_grade) for a in alerts]


class TestGrade3Plus:
    """`ae.grade3plus` fires from CTCAE grade 3: high for 3, critical for 4 and 5."""

    @pytest.mark.parametrize(
        ("grade", "expected"),
        [
            pytest.param(1, [], id="grade-1"),
            pytest.param(2, [], id="grade-2"),
            pytest.param(3, [("ae.grade3plus", "high", 3)], id="grade-3-high"),
            pytest.param(4, [("ae.grade3plus", "critical", 4)], id="grade-4-critical"),
        ],
    )
    def test_grade(self, make: EventFactory, apply_all: ApplyAll, grade: int, expected: list[Fired]) -> None:
        actual = fired(apply_all([make.ae(grade=grade, serious=False)]))
        assert expected == actual

    def test_grade_5_is_critical(self, make: EventFactory, apply_all: ApplyAll) -> None:
        # Grade 5 (death) is serious by definition: the contract refuses it with serious false.
        actual = fired(apply_all([make.ae(grade=5, serious=True)]))
        assert ("ae.grade3plus", "critical", 5) in actual

    def test_evidence_names_the_report(self, make: EventFactory, apply_all: ApplyAll) -> None:
        event = make.ae(grade=3, serious=False, ae_id="AE-7")
        (alert,) = apply_all([event])
        assert [event.event_id] == alert.evidence["event_ids"]


class TestSerious:
    """`ae.serious` is critical for any serious AE, whatever its grade."""

    @pytest.mark.parametrize(
        ("grade", "expected_rules"),
        [
            pytest.param(1, {("ae.serious", "critical")}, id="grade-1-serious"),
            pytest.param(2, {("ae.serious", "critical")}, id="grade-2-serious"),
            pytest.param(3, {("ae.serious", "critical"), ("ae.grade3plus", "high")}, id="grade-3-serious"),
            pytest.param(5, {("ae.serious", "critical"), ("ae.grade3plus", "critical")}, id="grade-5-serious"),
        ],
    )
    def test_fires(
        self, make: EventFactory, apply_all: ApplyAll, grade: int, expected_rules: set[tuple[str, str]]
    ) -> None:
        actual = {(a.rule, a.severity) for a in apply_all([make.ae(grade=grade, serious=True)])}
        assert expected_rules == actual

    def test_not_serious_grade_2_raises_nothing(self, make: EventFactory, apply_all: ApplyAll) -> None:
        expected = []
        assert expected == apply_all([make.ae(grade=2, serious=False)])


PLUS_5 = timezone(timedelta(hours=5, minutes=30))
CST = timezone(timedelta(hours=8))


class TestSeriousReportingClock:
    """`ae.serious` carries `report_due_at` = `recorded_at` + 24 h, or `occurred_at` + 24 h without `recorded_at`."""

    @pytest.mark.parametrize(
        ("occurred_at", "recorded_at", "expected_due"),
        [
            pytest.param(
                "2025-03-02T14:00:00+08:00",
                "2025-03-03T23:30:00+08:00",
                datetime(2025, 3, 4, 23, 30, tzinfo=CST),
                id="recorded_at-+08:00",
            ),
            pytest.param(
                "2025-03-02T14:00:00+08:00",
                "2025-03-03T06:15:00+05:30",
                datetime(2025, 3, 4, 6, 15, tzinfo=PLUS_5),
                id="recorded_at-in-another-offset",
            ),
            pytest.param(
                "2025-03-02T14:00:00+08:00",
                None,
                datetime(2025, 3, 3, 14, 0, tzinfo=CST),
                id="no-recorded_at-uses-occurred_at",
            ),
            pytest.param(
                "2025-03-31T22:00:00-05:00",
                None,
                datetime(2025, 4, 1, 22, 0, tzinfo=timezone(timedelta(hours=-5))),
                id="occurred_at-negative-offset-crossing-a-month",
            ),
        ],
    )
    def test_report_due_at(
        self,
        make: EventFactory,
        apply_all: ApplyAll,
        occurred_at: str,
        recorded_at: str | None,
        expected_due: datetime,
    ) -> None:
        alerts = apply_all([make.ae(grade=2, serious=True, occurred_at=occurred_at, recorded_at=recorded_at)])
        actual = [(a.rule, a.report_due_at) for a in alerts]
        assert [("ae.serious", expected_due)] == actual

    def test_due_time_is_24_hours_in_absolute_time(self, make: EventFactory, apply_all: ApplyAll) -> None:
        recorded = "2025-03-03T01:00:00+08:00"
        (alert,) = apply_all([make.ae(grade=1, serious=True, recorded_at=recorded)])
        assert alert.report_due_at is not None
        expected = timedelta(hours=24)
        assert expected == alert.report_due_at - datetime.fromisoformat(recorded)
