"""Analytes, their units (UCUM plus documented common spellings) and LOINC codes."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, get_args

Analyte = Literal[
    "platelets",
    "neutrophils",
    "wbc",
    "hemoglobin",
    "total_bilirubin",
    "alt",
    "ast",
    "alp",
    "albumin",
    "creatinine",
    "inr",
    "afp",
]
ANALYTES: tuple[str, ...] = get_args(Analyte)

# The unit every rule works in, per analyte: SI, as Chinese hospitals report.
CANONICAL_UNIT: dict[str, str] = {
    "platelets": "10*9/L",
    "neutrophils": "10*9/L",
    "wbc": "10*9/L",
    "hemoglobin": "g/L",
    "total_bilirubin": "umol/L",
    "alt": "U/L",
    "ast": "U/L",
    "alp": "U/L",
    "albumin": "g/L",
    "creatinine": "umol/L",
    "inr": "{INR}",
    "afp": "ng/mL",
}

_CELL_COUNT = {
    # 10^9/L = 10^3/uL = 10^3/mm3 = G/L (CTCAE text: 75,000/mm3 = 75 x 10^9/L).
    "10*9/L": Decimal(1),
    "10*3/uL": Decimal(1),
    "10*3/mm3": Decimal(1),
    "/nL": Decimal(1),
    # Cells per microlitre, as US reports give platelets (150000/uL).
    "/uL": Decimal("0.001"),
    "/mm3": Decimal("0.001"),
}

# How summaries name analytes and print canonical units.
ANALYTE_NAMES: dict[str, str] = {
    "platelets": "Platelets",
    "total_bilirubin": "Total bilirubin",
    "neutrophils": "Neutrophils",
    "wbc": "WBC",
    "hemoglobin": "Haemoglobin",
    "alt": "ALT",
    "ast": "AST",
    "alp": "ALP",
    "albumin": "Albumin",
    "creatinine": "Creatinine",
    "inr": "INR",
    "afp": "AFP",
}
DISPLAY_UNIT: dict[str, str] = {"10*9/L": "×10⁹/L", "umol/L": "µmol/L"}

# Factor that takes a value in the unit to the canonical unit, exactly.
# Decimal keeps the CTCAE boundaries exact: 3 mg/dL bilirubin is 51.3 umol/L,
# not 51.300000000000004, so "> 3 x ULN" means what it says.
TO_CANONICAL: dict[str, dict[str, Decimal]] = {
    "platelets": _CELL_COUNT,
    "neutrophils": _CELL_COUNT,
    "wbc": _CELL_COUNT,
    "hemoglobin": {
        "g/L": Decimal(1),
        "g/dL": Decimal(10),
        # Haemoglobin monomer, 16.114 g/mmol (CTCAE: 10 g/dL = 6.2 mmol/L).
        "mmol/L": Decimal("16.114"),
    },
    "total_bilirubin": {
        "umol/L": Decimal(1),
        "mg/dL": Decimal("17.1"),  # molar mass 584.66 g/mol
        "mg/L": Decimal("1.71"),
    },
    "alt": {"U/L": Decimal(1)},
    "ast": {"U/L": Decimal(1)},
    "alp": {"U/L": Decimal(1)},
    "albumin": {"g/L": Decimal(1), "g/dL": Decimal(10)},
    "creatinine": {
        "umol/L": Decimal(1),
        "mg/dL": Decimal("88.4"),  # molar mass 113.12 g/mol
    },
    "inr": {"{INR}": Decimal(1)},
    "afp": {
        "ng/mL": Decimal(1),
        "ug/L": Decimal(1),
        # 1 IU is about 1.21 ng (unverified; no v1 rule grades AFP).
        "[IU]/mL": Decimal("1.21"),
    },
}

# Common spellings publishers send, mapped to the UCUM code they mean. Only
# unambiguous ones: anything else must be fixed at the source.
UNIT_ALIASES: dict[str, str] = {
    "10^9/L": "10*9/L",
    "10E9/L": "10*9/L",
    "x10^9/L": "10*9/L",
    "×10⁹/L": "10*9/L",
    "G/L": "10*9/L",
    "10^3/uL": "10*3/uL",
    "10^3/µL": "10*3/uL",
    "10*3/µL": "10*3/uL",
    "K/uL": "10*3/uL",
    "10^3/mm3": "10*3/mm3",
    "/µL": "/uL",
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",  # Greek mu, as some systems spell micro
    "umol/l": "umol/L",
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "IU/L": "U/L",
    "[IU]/L": "U/L",
    "U/l": "U/L",
    "u/L": "U/L",
    "INR": "{INR}",
    "{ratio}": "{INR}",
    "1": "{INR}",
    "ratio": "{INR}",
    "IU/mL": "[IU]/mL",
    "µg/L": "ug/L",
    "ng/ml": "ng/mL",
}

# LOINC codes accepted per analyte (clinical-facts.md section 8). A molar and a
# mass code of the same analyte are both accepted: the value's unit decides.
ANALYTE_LOINC: dict[str, frozenset[str]] = {
    "platelets": frozenset({"777-3", "26515-7"}),
    "wbc": frozenset({"6690-2", "26464-8"}),
    "neutrophils": frozenset({"751-8", "26499-4", "753-4"}),
    "hemoglobin": frozenset({"718-7"}),
    "total_bilirubin": frozenset({"1975-2", "14631-6"}),
    "alt": frozenset({"1742-6"}),
    "ast": frozenset({"1920-8"}),
    "alp": frozenset({"6768-6"}),
    "albumin": frozenset({"1751-7"}),
    "creatinine": frozenset({"2160-0", "14682-9"}),
    "inr": frozenset({"6301-6", "34714-6", "38875-1", "46418-0"}),
    "afp": frozenset({"1834-1", "19176-7"}),
}


@dataclass(frozen=True, slots=True)
class Plausible:
    """What a real result of an analyte can be, in its canonical unit (CANONICAL_UNIT).

    Wide on purpose: a value outside is a typo, a unit slip or a placeholder,
    never a patient (the limits sit well beyond the extremes of clinical
    reports). A value above `value_max` is dead-lettered as
    `implausible_value`, so the site hears of it, rather than graded as if it
    were true; a reference range outside `uln_min`..`uln_max` is set aside
    (see `plausible_reference_range`).
    """

    value_max: Decimal
    uln_min: Decimal
    uln_max: Decimal


def _plausible(value_max: str, uln_min: str, uln_max: str) -> Plausible:
    return Plausible(Decimal(value_max), Decimal(uln_min), Decimal(uln_max))


PLAUSIBLE: dict[str, Plausible] = {
    "platelets": _plausible("5000", "100", "1000"),
    "neutrophils": _plausible("500", "1", "50"),
    "wbc": _plausible("1000", "2", "50"),
    "hemoglobin": _plausible("300", "50", "300"),
    "total_bilirubin": _plausible("2000", "3", "100"),
    "alt": _plausible("50000", "5", "500"),
    "ast": _plausible("50000", "5", "500"),
    "alp": _plausible("20000", "20", "1000"),
    "albumin": _plausible("100", "10", "100"),
    "creatinine": _plausible("5000", "20", "500"),
    "inr": _plausible("30", "0.5", "5"),
    # Alpha-fetoprotein in HCC can pass 10^6 ng/mL.
    "afp": _plausible("10000000", "1", "1000"),
}


def plausible_reference_range(analyte: str, ref_low: float | None, ref_high: float | None, unit: str) -> bool:
    """Whether a site's reference range is one a real laboratory could report (absent bounds pass)."""
    bounds = PLAUSIBLE[analyte]
    if ref_high is not None and not bounds.uln_min <= to_canonical(analyte, ref_high, unit) <= bounds.uln_max:
        return False
    if ref_low is not None and ref_high is not None and ref_low > ref_high:
        return False  # swapped columns
    return ref_low is None or to_canonical(analyte, ref_low, unit) <= bounds.uln_max


def ucum(unit: str) -> str:
    """The UCUM code a unit string means (its documented alias resolved)."""
    unit = unit.strip()
    return UNIT_ALIASES.get(unit, unit)


def unit_fits(analyte: str, unit: str) -> bool:
    return ucum(unit) in TO_CANONICAL[analyte]


def to_canonical(analyte: str, value: float, unit: str) -> Decimal:
    """The value in the analyte's canonical unit, computed exactly from its shortest decimal form."""
    return Decimal(repr(value)) * TO_CANONICAL[analyte][ucum(unit)]
