"""The trial protocol as data: thresholds, windows and defaults, loaded from `seeds/protocol-v1.toml`."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trialwatch.contract import SEVERITY_RANK, Severity
from trialwatch.units import CANONICAL_UNIT, ucum

DEFAULT_PROTOCOL_PATH = Path(__file__).resolve().parents[2] / "seeds" / "protocol-v1.toml"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReferenceRange(_Frozen):
    low: Decimal
    high: Decimal
    unit: str


class BelowBand(_Frozen):
    below: Decimal
    severity: Severity
    ctcae_grade: int


class AboveUlnBand(_Frozen):
    above_uln: Decimal
    severity: Severity
    ctcae_grade: int


class PlateletsRule(_Frozen):
    analyte: str
    bands: Annotated[list[BelowBand], Field(min_length=1)]

    @model_validator(mode="after")
    def _bands_tighten(self) -> PlateletsRule:
        # Sorted from mild to severe: a lower cut-off must mean a worse severity.
        ordered = sorted(self.bands, key=lambda b: b.below, reverse=True)
        ranks = [SEVERITY_RANK[b.severity] for b in ordered]
        if ranks != sorted(ranks):
            raise ValueError("platelet bands: a lower cut-off must not lower the severity")
        object.__setattr__(self, "bands", ordered)
        return self


class BilirubinRule(_Frozen):
    analyte: str
    bands: Annotated[list[AboveUlnBand], Field(min_length=1)]

    @model_validator(mode="after")
    def _bands_tighten(self) -> BilirubinRule:
        ordered = sorted(self.bands, key=lambda b: b.above_uln)
        ranks = [SEVERITY_RANK[b.severity] for b in ordered]
        if ranks != sorted(ranks):
            raise ValueError("bilirubin bands: a higher multiple must not lower the severity")
        object.__setattr__(self, "bands", ordered)
        return self


class AeGradeRule(_Frozen):
    min_grade: Annotated[int, Field(ge=1, le=5)]
    severity_by_grade: dict[int, Severity]


class AeSeriousRule(_Frozen):
    severity: Severity
    report_within_hours: Annotated[int, Field(gt=0)]


class SbrtWindowRule(_Frozen):
    at_risk_after_days: Annotated[int, Field(ge=0)]
    missed_after_days: Annotated[int, Field(ge=0)]
    at_risk_severity: Severity
    missed_severity: Severity

    @model_validator(mode="after")
    def _at_risk_before_missed(self) -> SbrtWindowRule:
        if self.at_risk_after_days >= self.missed_after_days:
            raise ValueError("sbrt.window: at_risk_after_days must be less than missed_after_days")
        return self


class RegimenRule(_Frozen):
    severity: Severity
    allowed_second_line: dict[str, list[str]]


class CrossoverRule(_Frozen):
    severity: Severity
    allowed_after_withdrawal_reason: str


class SeverityOnlyRule(_Frozen):
    severity: Severity


class GradeCriterion(_Frozen):
    grade: Annotated[int, Field(ge=1, le=5)]
    op: Literal["<", ">", ">="]
    times: Decimal
    of: Literal["abs", "lln", "uln", "bl"]


class CtcaeTerm(_Frozen):
    """CTCAE v5 grading of one analyte; `abnormal_baseline` applies when the baseline is above the ULN."""

    grades: Annotated[list[GradeCriterion], Field(min_length=1)]
    abnormal_baseline: list[GradeCriterion] | None = None


class RildCriterion(_Frozen):
    analyte: str
    above_uln: Decimal


class RildRule(_Frozen):
    severity: Severity
    window_days: Annotated[int, Field(gt=0)]
    criteria: Annotated[list[RildCriterion], Field(min_length=1)]


class EligibilityLab(_Frozen):
    analyte: str
    at_least: Decimal | None = None
    at_most_uln: Decimal | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> EligibilityLab:
        if (self.at_least is None) == (self.at_most_uln is None):
            raise ValueError(f"eligibility lab {self.analyte}: give exactly one of at_least, at_most_uln")
        return self


class EligibilityRule(_Frozen):
    severity: Severity
    min_age_years: int
    max_age_years: int
    min_kps: int
    max_child_pugh_score: int
    allowed_first_line: list[str]
    screening_window_days: Annotated[int, Field(ge=0)]
    labs: list[EligibilityLab]


class RecistRule(_Frozen):
    severity: Severity
    pd_min_increase_fraction: Decimal
    pd_min_increase_mm: Decimal
    pr_min_decrease_fraction: Decimal
    node_normal_below_mm: Decimal


class ToxicityBoundaryRule(_Frozen):
    severity: Severity
    prior_a: Annotated[float, Field(gt=0)]
    prior_b: Annotated[float, Field(gt=0)]
    p0: Annotated[float, Field(gt=0, lt=1)]
    cutoff: Annotated[float, Field(gt=0, lt=1)]
    min_grade: Annotated[int, Field(ge=1, le=5)]
    related_attributions: list[str]


class Rules(_Frozen):
    platelets_low: PlateletsRule = Field(alias="lab.platelets.low")
    bilirubin_high: BilirubinRule = Field(alias="lab.bilirubin.high")
    ae_grade3plus: AeGradeRule = Field(alias="ae.grade3plus")
    ae_serious: AeSeriousRule = Field(alias="ae.serious")
    sbrt_window: SbrtWindowRule = Field(alias="sbrt.window")
    regimen_mismatch: RegimenRule = Field(alias="protocol.regimen_mismatch")
    crossover: CrossoverRule = Field(alias="protocol.crossover")
    systemic_held_during_sbrt: SeverityOnlyRule = Field(alias="protocol.systemic_held_during_sbrt")
    ctcae_grade3plus: AeGradeRule = Field(alias="lab.ctcae.grade3plus")
    rild: RildRule = Field(alias="rild.suspected")
    eligibility: EligibilityRule = Field(alias="eligibility.violation")
    recist: RecistRule = Field(alias="recist.progression")
    toxicity_boundary: ToxicityBoundaryRule = Field(alias="dsmb.toxicity_boundary")


class Protocol(_Frozen):
    version: str
    trial: str
    ctcae_version: str
    sites: tuple[str, ...] = ()
    reference_ranges: dict[str, ReferenceRange]
    rules: Rules
    ctcae: dict[str, CtcaeTerm]

    @model_validator(mode="after")
    def _ranges_in_canonical_units(self) -> Protocol:
        # Rules compare canonical values; a default range in another unit
        # would silently shift every threshold.
        for analyte, unit in CANONICAL_UNIT.items():
            rng = self.reference_ranges.get(analyte)
            if rng is None:
                raise ValueError(f"reference_ranges lacks {analyte!r}")
            if ucum(rng.unit) != unit:
                raise ValueError(f"reference range of {analyte!r} must be in {unit}, not {rng.unit}")
        return self


def load_protocol(path: Path = DEFAULT_PROTOCOL_PATH) -> Protocol:
    """Read and check the protocol file; a bad file fails start-up, never a rule at run time."""
    with path.open("rb") as f:
        raw = tomllib.load(f)
    # TOML inline-table keys are strings; the grade map wants ints.
    for rule in ("ae.grade3plus", "lab.ctcae.grade3plus"):
        grades = raw.get("rules", {}).get(rule, {}).get("severity_by_grade")
        if isinstance(grades, dict):
            raw["rules"][rule]["severity_by_grade"] = {int(k): v for k, v in grades.items()}
    return Protocol.model_validate(raw)
