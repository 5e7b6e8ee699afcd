"""`trialwatch seed`: deterministic, valid, in the units Chinese hospitals report, and exercising every rule."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import date, datetime

from tests.unit.test_demo_cohort import CATALOGUE
from trialwatch.cohort import write
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file

START = date(2025, 1, 6)


def cohort(subjects: int, seed: int) -> str:
    return "".join(write(subjects, seed, START))


class TestGenerator:
    """The same seed gives the same file; another seed another one."""

    def test_deterministic_for_a_seed(self) -> None:
        assert cohort(30, 5) == cohort(30, 5)
        assert cohort(30, 5) != cohort(30, 6)

    def test_labs_in_si_units(self) -> None:
        units = {
            (line["value"]["analyte"], line["value"]["unit"])
            for line in map(json.loads, cohort(30, 1).splitlines())
            if line["topic"] == "trial.labs.v1"
        }
        assert {("total_bilirubin", "umol/L"), ("albumin", "g/L"), ("hemoglobin", "g/L")} <= units
        assert not any(unit in ("mg/dL", "g/dL") for _, unit in units)

    def test_both_arms_and_every_topic(self) -> None:
        lines = list(map(json.loads, cohort(70, 1).splitlines()))
        arms = Counter(line["value"]["arm"] for line in lines if line["topic"] == "trial.enrollment.v1")
        topics = {line["topic"] for line in lines}
        assert {"sbrt", "control"} == set(arms)
        assert 70 == sum(arms.values())
        assert 5 == len(topics)

    def test_until_is_the_same_cohort_cut_at_that_moment(self) -> None:
        """`make run` publishes the cohort 'as of now': a prefix of the full file, nothing later."""
        full = cohort(30, 3).splitlines()
        cut = datetime.fromisoformat("2025-03-01T00:00:00+08:00")
        partial = "".join(write(30, 3, START, until=cut)).splitlines()
        assert 0 < len(partial) < len(full)
        assert full[: len(partial)] == partial
        assert all(datetime.fromisoformat(json.loads(x)["value"]["occurred_at"]) <= cut for x in partial)
        assert datetime.fromisoformat(json.loads(full[len(partial)])["value"]["occurred_at"]) > cut


class TestThousandSubjects:
    """1,000 subjects: every line valid, and replayed, every rule of the catalogue fires."""

    def test_valid_and_every_rule_fires(self) -> None:
        replay = Replay(Engine(load_protocol()))
        alerts = []
        bad = []
        for line_no, item in read_event_file(io.StringIO(cohort(1000, 7))):
            if isinstance(item, BadLine):
                bad.append((line_no, item.reason, item.detail))
            else:
                alerts += replay.apply(item)
        alerts += replay.finish(datetime.fromisoformat("2027-12-31T00:00:00+08:00"))

        assert [] == bad
        assert CATALOGUE == {a.rule for a in alerts}
