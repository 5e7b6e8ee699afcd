"""Issue 10, defect 2: /metrics is operations' view, and operations are blinded.

`trialwatch_alerts_produced_total{rule="dsmb.toxicity_boundary"}` and the
counts of rules that exist in one arm only told anyone who could scrape the
worker what the DSMB alone may know; a publisher could also grow the site
label without bound. The worker's real metrics registry is scraped here
after the engine's real alerts for subjects of both arms.
"""

from __future__ import annotations

import json
from datetime import date

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.test_worker import FakeProducer, policy_worker
from trialwatch.cohort import generate
from trialwatch.contract import ALERTS, ALERTS_MASKED, reveals_arm
from trialwatch.metrics import UNBLINDED_RULES
from trialwatch.worker import Record, SubjectWorker


async def _run(lines: list[dict[str, object]]) -> tuple[SubjectWorker, CollectorRegistry, FakeProducer]:
    producer = FakeProducer()
    worker, registry = policy_worker(producer)
    states: dict[bytes, bytes] = {}
    arms: dict[bytes, bytes] = {}
    for offset, line in enumerate(lines):
        value = line["value"]
        assert isinstance(value, dict)
        key = str(value["subject_id"]).encode()
        await worker.handle(Record(str(line["topic"]), 0, offset, key, json.dumps(value).encode()), states)
        # The arm facts the worker published go through its arm-level monitor, as live.
        for topic, fact_key, fact in list(producer.sent):
            if topic == "trialwatch-arm-facts":
                producer.sent.remove((topic, fact_key, fact))
                await worker.handle_arm_fact(Record(topic, 0, offset, fact_key, fact), arms)
    return worker, registry, producer


@pytest.fixture(scope="module")
def scraped() -> tuple[str, list[str], set[str]]:
    import asyncio

    lines = list(generate(120, seed=3, start=date(2025, 1, 1)))
    lines += [
        {**line, "value": {**line["value"], "site_id": f"SITE-NEW-{i}"}}
        for i, line in enumerate(generate(3, seed=4, start=date(2025, 1, 1)))
    ]
    _, registry, producer = asyncio.run(_run(lines))
    rules = {json.loads(v)["rule"] for t, _, v in producer.sent if t == ALERTS}
    return (
        generate_latest(registry).decode(),
        [json.loads(v)["rule"] for t, _, v in producer.sent if t == ALERTS_MASKED],
        rules,
    )


def _label_values(text: str, family: str, label: str) -> set[str]:
    """The values of one label over a family's samples in a scrape."""
    return {
        line.split(f'{label}="', 1)[1].split('"', 1)[0] for line in text.splitlines() if line.startswith(family + "{")
    }


def test_the_run_raised_rules_of_both_kinds(scraped: tuple[str, list[str], set[str]]) -> None:
    _, _, rules = scraped
    assert {"sbrt.window.missed", "rild.suspected", "protocol.crossover", "dsmb.toxicity_boundary"} <= rules
    assert {"lab.platelets.low", "ae.serious"} <= rules


def test_no_rule_outside_the_masked_stream_is_named(scraped: tuple[str, list[str], set[str]]) -> None:
    text, masked_rules, rules = scraped
    named = _label_values(text, "trialwatch_alerts_produced_total", "rule")
    assert set(masked_rules) | {UNBLINDED_RULES} == named
    assert [] == [r for r in rules if reveals_arm(r) and r in text]


def test_one_label_combination_for_every_rule_off_the_masked_stream(scraped: tuple[str, list[str], set[str]]) -> None:
    # Severity and status would tell those rules apart: the stopping boundary is the only critical one.
    text, _, _ = scraped
    unblinded = [
        line.split("}", 1)[0]
        for line in text.splitlines()
        if line.startswith("trialwatch_alerts_produced_total{") and UNBLINDED_RULES in line
    ]
    expected = [
        f'trialwatch_alerts_produced_total{{rule="{UNBLINDED_RULES}",severity="{UNBLINDED_RULES}",status="{UNBLINDED_RULES}"'
    ]
    assert expected == unblinded


def test_site_labels_are_the_protocols_sites_or_other(scraped: tuple[str, list[str], set[str]]) -> None:
    text, _, _ = scraped
    sites = _label_values(text, "trialwatch_site_last_event_timestamp_seconds", "site")
    assert "other" in sites
    assert [] == [s for s in sites if s.startswith("SITE-NEW")]


def test_arm_never_appears_in_metrics(scraped: tuple[str, list[str], set[str]]) -> None:
    text, _, _ = scraped
    assert ("sbrt" in text.lower(), "control" in text.lower()) == (False, False)
