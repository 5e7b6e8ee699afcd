"""The `make run` cohort exercises every rule of the catalogue, whatever day it is run."""

from __future__ import annotations

import io
from datetime import date, datetime, time

import pytest

from tests.catalogue import CATALOGUE
from trialwatch.demo import SITE_TZ, demo_cohort
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file


@pytest.mark.parametrize("today", [date(2025, 3, 1), date(2026, 11, 28), date(2028, 2, 29)], ids=str)
def test_demo_cohort_raises_every_rule_of_the_catalogue(today: date) -> None:
    replay = Replay(Engine(load_protocol()))
    alerts = []
    for _, item in read_event_file(io.StringIO(demo_cohort(today))):
        assert not isinstance(item, BadLine), item
        alerts += replay.apply(item)
    alerts += replay.finish(datetime.combine(today, time(12, 0), SITE_TZ))

    assert CATALOGUE == {a.rule for a in alerts}
    # No alert of the demo is raised only to be taken back by the next record.
    flapping = [a.rule for a in alerts if a.status == "resolved" and a.rule.startswith("sbrt.window.missed")]
    assert [] == flapping
