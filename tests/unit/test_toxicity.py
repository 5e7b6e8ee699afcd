"""The arm-level Bayesian toxicity boundary against its published calibration."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from trialwatch.contract import mask
from trialwatch.engine.toxicity import ArmFact, ArmMonitor, posterior_prob_above, regularized_beta
from trialwatch.protocol import load_protocol

PROTOCOL = load_protocol()
SPEC = PROTOCOL.rules.toxicity_boundary
NOW = datetime(2025, 6, 1, tzinfo=UTC)

# stoppingrule README, calc.rule.bin(type="BB"), N=30, p0=0.2, Beta(0.6, 2.4):
# stop when toxicities >= x among n subjects (clinical-facts.md section 6).
PUBLISHED = [(lo, hi, x) for lo, hi, x in [(3, 4, 3), (5, 6, 4), (7, 10, 5), (11, 13, 6), (14, 17, 7),
                                           (18, 20, 8), (21, 24, 9), (25, 28, 10), (29, 30, 11)]]  # fmt: skip
CASES = [(n, x) for lo, hi, x in PUBLISHED for n in range(lo, hi + 1)]


class TestPosterior:
    """P(p > p0 | data) reproduces the published figures and boundary table."""

    def test_published_spot_values(self) -> None:
        assert (0.966, 0.886) == (
            round(posterior_prob_above(5, 10, SPEC), 3),
            round(posterior_prob_above(4, 10, SPEC), 3),
        )

    @pytest.mark.parametrize(("n", "x"), CASES, ids=[f"{x}of{n}" for n, x in CASES])
    def test_boundary_stops_at_x_and_not_one_below(self, n: int, x: int) -> None:
        assert (True, False) == (
            posterior_prob_above(x, n, SPEC) > SPEC.cutoff,
            posterior_prob_above(x - 1, n, SPEC) > SPEC.cutoff,
        )

    @pytest.mark.parametrize(
        ("x", "a", "b", "expected"),
        [(0.5, 1.0, 1.0, 0.5), (0.2, 1.0, 1.0, 0.2), (0.3, 2.0, 1.0, 0.09), (0.3, 1.0, 2.0, 0.51)],
        ids=["uniform-mid", "uniform", "x-squared", "1-(1-x)^2"],
    )
    def test_regularized_beta_closed_forms(self, x: float, a: float, b: float, expected: float) -> None:
        assert expected == pytest.approx(regularized_beta(x, a, b), abs=1e-12)


class TestArmMonitor:
    """Facts fold into per-arm counts; crossing the boundary raises one critical DSMB-only alert."""

    def run(self, facts: list[ArmFact]) -> list[tuple[str, str, int]]:
        monitor, states, out = ArmMonitor(PROTOCOL), {}, []
        for fact in facts:
            states[fact.arm], alerts = monitor.apply(states.get(fact.arm), fact, NOW)
            out += [(a.arm or "", a.status, a.revision) for a in alerts]
        return out

    def test_fires_when_the_boundary_is_crossed_and_not_before(self) -> None:
        facts = [ArmFact(f"S{i}", "sbrt", i < 3, f"e{i}") for i in range(3)]
        assert [("sbrt", "firing", 1)] == self.run(facts)
        assert [] == self.run(facts[:2])

    def test_repeated_and_unchanged_facts_change_nothing(self) -> None:
        facts = [ArmFact(f"S{i}", "control", True, f"e{i}") for i in range(3)]
        assert [("control", "firing", 1)] == self.run(facts + facts)

    def test_arms_are_counted_apart(self) -> None:
        facts = [
            ArmFact("S1", "sbrt", True, "e1"),
            ArmFact("S2", "control", True, "e2"),
            ArmFact("S3", "sbrt", True, "e3"),
        ]
        assert [] == self.run(facts)

    def test_downgraded_subjects_resolve_the_alert(self) -> None:
        facts = [ArmFact(f"S{i}", "sbrt", True, f"e{i}") for i in range(3)]
        facts += [ArmFact("S0", "sbrt", False, "e9"), ArmFact("S1", "sbrt", False, "e10")]
        assert [("sbrt", "firing", 1), ("sbrt", "resolved", 2)] == self.run(facts)

    def test_boundary_alert_never_reaches_the_masked_stream(self) -> None:
        monitor = ArmMonitor(PROTOCOL)
        state = None
        alerts = []
        for i in range(3):
            state, out = monitor.apply(state, ArmFact(f"S{i}", "sbrt", True, f"e{i}"), NOW)
            alerts += out
        assert ["critical"] == [a.severity for a in alerts]
        assert [None] == [mask(a) for a in alerts]
