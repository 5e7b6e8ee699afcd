"""The DSMB's arm-level toxicity monitor: a Bayesian beta-binomial stopping boundary per arm.

Two pure functions, as the subject engine: `subject_fact` says whether a
subject counts, `ArmMonitor.apply` folds one fact into an arm's state. The
live service runs them in two agents (the fact crosses a topic keyed by arm);
replay runs them in sequence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from trialwatch.contract import AdverseEvent, AlertMessage, Arm, Enrollment
from trialwatch.engine.lifecycle import alert_id, bounded
from trialwatch.engine.state import AdverseEventReport, SubjectState
from trialwatch.protocol import Protocol, ToxicityBoundaryRule

RULE = "dsmb.toxicity_boundary"


@dataclass(frozen=True, slots=True)
class ArmFact:
    """Whether one subject of an arm has a treatment-related grade >= 3 adverse event now."""

    subject_id: str
    arm: str
    counted: bool
    event_id: str

    @classmethod
    def from_bytes(cls, raw: bytes) -> ArmFact:
        """A fact as the worker published it; ValueError for anything else (a corrupt or foreign record)."""
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {"subject_id", "arm", "counted", "event_id"}:
            raise ValueError("not an arm fact")
        fact = cls(**data)
        if not (
            isinstance(fact.subject_id, str)
            and fact.arm in ("sbrt", "control")
            and isinstance(fact.counted, bool)
            and isinstance(fact.event_id, str)
        ):
            raise ValueError("not an arm fact")
        return fact


def can_change_fact(event: object) -> bool:
    """Only an enrolment (the arm) or an adverse event (the count) changes what a subject contributes."""
    return isinstance(event, Enrollment | AdverseEvent)


def subject_fact(state: SubjectState, protocol: Protocol, event_id: str) -> ArmFact | None:
    if state.arm is None:
        return None
    spec = protocol.rules.toxicity_boundary
    counted = state.counted_forgotten > 0 or any(_counts(ae, spec) for ae in state.adverse_events.values())
    return ArmFact(state.subject_id, str(state.arm), counted, event_id)


def _counts(ae: AdverseEventReport, spec: ToxicityBoundaryRule) -> bool:
    return ae.grade >= spec.min_grade and ae.attribution in spec.related_attributions


def pinned_reports(state: SubjectState, protocol: Protocol) -> set[str]:
    """What the monitor reads of the past: the AEs that count (treatment-related, grade >= min_grade)."""
    spec = protocol.rules.toxicity_boundary
    return {key for key, ae in state.adverse_events.items() if _counts(ae, spec)}


def changed_fact(before: ArmFact | None, after: ArmFact | None) -> ArmFact | None:
    """`after` when it says something new about the subject (arm or counted), else None."""
    if after is None or (before is not None and (before.arm, before.counted) == (after.arm, after.counted)):
        return None
    return after


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError("incomplete beta: continued fraction did not converge")


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the CDF of Beta(a, b) at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def posterior_prob_above(toxic: int, n: int, spec: ToxicityBoundaryRule) -> float:
    """P(p > p0 | toxic of n), prior Beta(a, b): posterior Beta(a + toxic, b + n - toxic)."""
    return 1.0 - regularized_beta(spec.p0, spec.prior_a + toxic, spec.prior_b + n - toxic)


class ArmState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arm: str
    subjects: dict[str, bool] = {}
    alert_id: str | None = None
    revision: int = 0
    status: str | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ArmState:
        return cls.model_validate_json(data)


class ArmMonitor:
    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.spec = protocol.rules.toxicity_boundary

    def apply(self, state: ArmState | None, fact: ArmFact, now: datetime) -> tuple[ArmState, list[AlertMessage]]:
        state = state or ArmState(arm=fact.arm)
        if state.subjects.get(fact.subject_id) == fact.counted:
            return state, []  # a re-sent or unchanged fact
        state.subjects[fact.subject_id] = fact.counted
        n = len(state.subjects)
        toxic = sum(state.subjects.values())
        prob = posterior_prob_above(toxic, n, self.spec)
        crossed = prob > self.spec.cutoff
        evidence: dict[str, Any] = {
            "event_ids": [fact.event_id],
            "arm": fact.arm,
            "subjects_with_related_grade3plus": toxic,
            "subjects_in_arm": n,
            "posterior_prob_above_p0": round(prob, 6),
            "counted_subjects": sorted(s for s, c in state.subjects.items() if c),
            "parameters": self.spec.model_dump(mode="json"),
            "protocol_version": self.protocol.version,
        }
        firing = state.status == "firing"
        if crossed and not firing:
            state.alert_id = alert_id(self.protocol.trial, f"arm:{fact.arm}", RULE, fact.arm, fact.event_id)
            state.revision, state.status = 1, "firing"
            summary = (
                f"Toxicity stopping boundary crossed in the {fact.arm} arm: {toxic} of {n} subjects with a "
                f"treatment-related grade >= {self.spec.min_grade} AE, P(rate > {self.spec.p0}) = {prob:.3f} "
                f"> {self.spec.cutoff}"
            )
        elif firing and not crossed:
            state.revision, state.status = state.revision + 1, "resolved"
            summary = f"Resolved: {RULE} in the {fact.arm} arm, {toxic} of {n}, P = {prob:.3f}"
        else:
            return state, []
        assert state.alert_id is not None
        return state, [
            AlertMessage(
                alert_id=state.alert_id,
                revision=state.revision,
                status="firing" if state.status == "firing" else "resolved",
                rule=RULE,
                severity=self.spec.severity,
                subject_id=f"arm:{fact.arm}",
                site_id="all",
                arm=Arm(fact.arm),
                occurred_at=now,
                raised_at=now,
                evidence=bounded(evidence),
                summary=summary,
            )
        ]
