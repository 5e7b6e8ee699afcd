"""Units and LOINC codes of lab results, from clinical-facts.md §7 (units) and §8 (LOINC).

The conversions are exact: a CTCAE boundary such as 3 mg/dL bilirubin must
land on 51.3 umol/L, not a binary float next to it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from trialwatch.contract import LABS, Lab
from trialwatch.decode import Rejection, decode
from trialwatch.schemas import SCHEMA_DIR
from trialwatch.units import to_canonical, ucum, unit_fits

EVENT_ID = "lab-0001"


def lab(**overrides: Any) -> bytes:
    """A valid lab message (platelets in 10*9/L) with fields overridden."""
    body: dict[str, Any] = {
        "event_id": EVENT_ID,
        "subject_id": "S-0001",
        "site_id": "SITE-A",
        "occurred_at": "2025-03-01T08:00:00+08:00",
        "analyte": "platelets",
        "value": 75,
        "unit": "10*9/L",
        **overrides,
    }
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def accepted(**overrides: Any) -> Lab:
    result = decode(LABS, lab(**overrides))
    assert isinstance(result, Lab), f"rejected: {result}"
    return result


# Documented spellings (contract: "common spellings such as 10^9/L are accepted and documented"),
# the UCUM code each one means, and an analyte reported in it.
ALIASES: list[tuple[str, str, str]] = [
    ("10^9/L", "10*9/L", "platelets"),
    ("10E9/L", "10*9/L", "wbc"),
    ("x10^9/L", "10*9/L", "neutrophils"),
    ("×10⁹/L", "10*9/L", "platelets"),
    ("G/L", "10*9/L", "platelets"),
    ("10^3/uL", "10*3/uL", "platelets"),
    ("10^3/µL", "10*3/uL", "wbc"),
    ("10*3/µL", "10*3/uL", "neutrophils"),
    ("K/uL", "10*3/uL", "platelets"),
    ("10^3/mm3", "10*3/mm3", "platelets"),
    ("/µL", "/uL", "platelets"),
    ("µmol/L", "umol/L", "total_bilirubin"),  # micro sign U+00B5
    ("μmol/L", "umol/L", "creatinine"),  # Greek mu U+03BC
    ("umol/l", "umol/L", "creatinine"),
    ("mg/dl", "mg/dL", "total_bilirubin"),
    ("mg/dl", "mg/dL", "creatinine"),
    ("g/dl", "g/dL", "albumin"),
    ("g/dl", "g/dL", "hemoglobin"),
    ("g/l", "g/L", "hemoglobin"),
    ("IU/L", "U/L", "alt"),
    ("[IU]/L", "U/L", "ast"),
    ("U/l", "U/L", "alp"),
    ("u/L", "U/L", "alt"),
    ("INR", "{INR}", "inr"),
    ("{ratio}", "{INR}", "inr"),
    ("ratio", "{INR}", "inr"),
    ("1", "{INR}", "inr"),
    ("IU/mL", "[IU]/mL", "afp"),
    ("µg/L", "ug/L", "afp"),
    ("ng/ml", "ng/mL", "afp"),
]

# UCUM codes clinical-facts.md §7 lists, with an analyte each is reported in.
UCUM_CODES: list[tuple[str, str]] = [
    ("10*9/L", "platelets"),
    ("10*9/L", "wbc"),
    ("10*9/L", "neutrophils"),
    ("10*3/uL", "platelets"),
    ("10*3/uL", "wbc"),
    ("10*3/uL", "neutrophils"),
    ("g/L", "hemoglobin"),
    ("g/L", "albumin"),
    ("g/dL", "hemoglobin"),
    ("g/dL", "albumin"),
    ("umol/L", "total_bilirubin"),
    ("umol/L", "creatinine"),
    ("mg/dL", "total_bilirubin"),
    ("mg/dL", "creatinine"),
    ("ng/mL", "afp"),
    ("[IU]/mL", "afp"),
    ("U/L", "alt"),
    ("U/L", "ast"),
    ("U/L", "alp"),
    ("{INR}", "inr"),
]


def _documented_aliases() -> dict[str, str]:
    data: dict[str, str] = json.loads((SCHEMA_DIR / "units.json").read_text(encoding="utf-8"))["aliases"]
    return data


class TestAliasesResolveToUcum:
    """Every documented spelling resolves to the UCUM code it means, and that code is accepted for its analyte."""

    @pytest.mark.parametrize(("alias", "code", "analyte"), ALIASES, ids=[f"{a}-{n}" for a, _, n in ALIASES])
    def test_ucum(self, alias: str, code: str, analyte: str) -> None:
        assert code == ucum(alias)

    @pytest.mark.parametrize(("alias", "code", "analyte"), ALIASES, ids=[f"{a}-{n}" for a, _, n in ALIASES])
    def test_fits_analyte(self, alias: str, code: str, analyte: str) -> None:
        expected = (True, True)
        assert expected == (unit_fits(analyte, alias), unit_fits(analyte, code))

    @pytest.mark.parametrize(("alias", "code", "analyte"), ALIASES, ids=[f"{a}-{n}" for a, _, n in ALIASES])
    def test_decode_accepts(self, alias: str, code: str, analyte: str) -> None:
        # A value plausible in every unit of every analyte (75 mg/dL creatinine would not be).
        assert analyte == accepted(analyte=analyte, unit=alias, value=1).analyte

    @pytest.mark.parametrize(
        ("alias", "code"), sorted(_documented_aliases().items()), ids=sorted(_documented_aliases())
    )
    def test_every_alias_in_units_json_resolves_to_an_accepted_code(self, alias: str, code: str) -> None:
        accepted_units: dict[str, list[str]] = json.loads((SCHEMA_DIR / "units.json").read_text(encoding="utf-8"))[
            "accepted_units"
        ]
        analytes = sorted(a for a, units in accepted_units.items() if code in units)
        assert code == ucum(alias)
        assert analytes, f"{alias!r} -> {code!r} is accepted for no analyte"
        assert [True] * len(analytes) == [unit_fits(a, alias) for a in analytes]

    @pytest.mark.parametrize(("code", "analyte"), UCUM_CODES, ids=[f"{c}-{a}" for c, a in UCUM_CODES])
    def test_ucum_codes_are_fixed_points(self, code: str, analyte: str) -> None:
        assert (code, True) == (ucum(code), unit_fits(analyte, code))


class TestExactConversion:
    """to_canonical gives the exact SI value as a Decimal (clinical-facts.md §7 factors)."""

    @pytest.mark.parametrize(
        ("analyte", "value", "unit", "expected"),
        [
            pytest.param("total_bilirubin", 3, "mg/dL", Decimal("51.3"), id="bilirubin-3mg/dL"),
            pytest.param("total_bilirubin", 3.0, "mg/dL", Decimal("51.3"), id="bilirubin-3.0mg/dL"),
            pytest.param("total_bilirubin", 1.5, "mg/dL", Decimal("25.65"), id="bilirubin-1.5mg/dL"),
            pytest.param("total_bilirubin", 0.1, "mg/dL", Decimal("1.71"), id="bilirubin-0.1mg/dL"),
            pytest.param("total_bilirubin", 3, "mg/dl", Decimal("51.3"), id="bilirubin-alias-mg/dl"),
            pytest.param("total_bilirubin", 51.3, "umol/L", Decimal("51.3"), id="bilirubin-umol/L"),
            pytest.param("total_bilirubin", 51.3, "µmol/L", Decimal("51.3"), id="bilirubin-alias-µmol/L"),
            pytest.param("creatinine", 1, "mg/dL", Decimal("88.4"), id="creatinine-1mg/dL"),
            pytest.param("creatinine", 1.2, "mg/dL", Decimal("106.08"), id="creatinine-1.2mg/dL"),
            pytest.param("creatinine", 88.4, "umol/L", Decimal("88.4"), id="creatinine-umol/L"),
            pytest.param("albumin", 3.5, "g/dL", Decimal("35"), id="albumin-3.5g/dL"),
            pytest.param("albumin", 2.8, "g/dL", Decimal("28"), id="albumin-2.8g/dL-eligibility"),
            pytest.param("albumin", 35, "g/L", Decimal("35"), id="albumin-g/L"),
            pytest.param("hemoglobin", 9.0, "g/dL", Decimal("90"), id="hemoglobin-9g/dL-eligibility"),
            pytest.param("hemoglobin", 90, "g/L", Decimal("90"), id="hemoglobin-g/L"),
            pytest.param("platelets", 75000, "/uL", Decimal("75"), id="platelets-75000/uL"),
            pytest.param("platelets", 75000, "/mm3", Decimal("75"), id="platelets-75000/mm3"),
            pytest.param("platelets", 75, "10*3/uL", Decimal("75"), id="platelets-10*3/uL"),
            pytest.param("platelets", 75, "10^9/L", Decimal("75"), id="platelets-alias-10^9/L"),
            pytest.param("wbc", 3.5, "10*3/uL", Decimal("3.5"), id="wbc-10*3/uL"),
            pytest.param("neutrophils", 1.8, "10*9/L", Decimal("1.8"), id="neutrophils-10*9/L"),
            pytest.param("neutrophils", 1500, "/uL", Decimal("1.5"), id="neutrophils-1500/uL"),
            pytest.param("alt", 40, "IU/L", Decimal("40"), id="alt-IU/L"),
            pytest.param("inr", 1.2, "{INR}", Decimal("1.2"), id="inr"),
            pytest.param("afp", 400, "ng/mL", Decimal("400"), id="afp-ng/mL"),
        ],
    )
    def test_value(self, analyte: str, value: float, unit: str, expected: Decimal) -> None:
        actual = to_canonical(analyte, value, unit)
        assert (Decimal, expected) == (type(actual), actual)

    @pytest.mark.parametrize("analyte", ["platelets", "wbc", "neutrophils"])
    @pytest.mark.parametrize("value", [0.5, 24.9, 75, 150.25])
    def test_10e3_per_uL_equals_10e9_per_L(self, analyte: str, value: float) -> None:
        assert to_canonical(analyte, value, "10*9/L") == to_canonical(analyte, value, "10*3/uL")

    @pytest.mark.parametrize(
        ("analyte", "value", "unit", "expected"),
        [
            pytest.param("total_bilirubin", 3, "mg/dL", Decimal("51.3"), id="bilirubin-3mg/dL"),
            pytest.param("creatinine", 1, "mg/dL", Decimal("88.4"), id="creatinine-1mg/dL"),
            pytest.param("albumin", 3.5, "g/dL", Decimal("35"), id="albumin-3.5g/dL"),
            pytest.param("platelets", 75000, "/uL", Decimal("75"), id="platelets-75000/uL"),
        ],
    )
    def test_decoded_lab_converts_exactly(self, analyte: str, value: float, unit: str, expected: Decimal) -> None:
        event = accepted(analyte=analyte, value=value, unit=unit)
        assert expected == to_canonical(event.analyte, event.value, event.unit)


# clinical-facts.md §8: every code of every contract analyte, with a unit it is reported in.
# Left out: PT 5902-2 (not a contract analyte) and AFP 19177-5 (flagged ambiguous/unverified).
LOINC_CODES: list[tuple[str, str, str]] = [
    ("platelets", "777-3", "10*9/L"),
    ("platelets", "26515-7", "10*9/L"),
    ("wbc", "6690-2", "10*9/L"),
    ("wbc", "26464-8", "10*9/L"),
    ("neutrophils", "751-8", "10*9/L"),
    ("neutrophils", "26499-4", "10*9/L"),
    ("neutrophils", "753-4", "10*9/L"),
    ("hemoglobin", "718-7", "g/dL"),
    ("hemoglobin", "718-7", "g/L"),
    ("total_bilirubin", "1975-2", "mg/dL"),
    ("total_bilirubin", "14631-6", "umol/L"),
    ("alt", "1742-6", "U/L"),
    ("ast", "1920-8", "U/L"),
    ("alp", "6768-6", "U/L"),
    ("albumin", "1751-7", "g/L"),
    ("albumin", "1751-7", "g/dL"),
    ("creatinine", "2160-0", "mg/dL"),
    ("creatinine", "14682-9", "umol/L"),
    ("inr", "6301-6", "{INR}"),
    ("inr", "34714-6", "{INR}"),
    ("inr", "38875-1", "{INR}"),
    ("inr", "46418-0", "{INR}"),
    ("afp", "1834-1", "ng/mL"),
    ("afp", "19176-7", "[IU]/mL"),
]

# A code of another analyte (or of PT, which is not INR) for each analyte.
FOREIGN_LOINC: list[tuple[str, str, str]] = [
    ("platelets", "6690-2", "10*9/L"),  # WBC
    ("platelets", "718-7", "10*9/L"),  # hemoglobin
    ("wbc", "777-3", "10*9/L"),  # platelets
    ("neutrophils", "26464-8", "10*9/L"),  # WBC generic
    ("hemoglobin", "1751-7", "g/L"),  # albumin
    ("total_bilirubin", "14682-9", "umol/L"),  # creatinine, molar
    ("total_bilirubin", "2160-0", "mg/dL"),  # creatinine, mass
    ("alt", "1920-8", "U/L"),  # AST
    ("ast", "1742-6", "U/L"),  # ALT
    ("alp", "1742-6", "U/L"),  # ALT
    ("albumin", "718-7", "g/L"),  # hemoglobin
    ("creatinine", "1975-2", "mg/dL"),  # bilirubin, mass
    ("creatinine", "14631-6", "umol/L"),  # bilirubin, molar
    ("inr", "5902-2", "{INR}"),  # prothrombin time
    ("afp", "718-7", "ng/mL"),  # hemoglobin
]


class TestLoincCodes:
    """A lab's LOINC code is accepted when it is a code of its analyte (§8) and rejected when it is another's."""

    @pytest.mark.parametrize(("analyte", "loinc", "unit"), LOINC_CODES, ids=[f"{a}-{c}-{u}" for a, c, u in LOINC_CODES])
    def test_accepted(self, analyte: str, loinc: str, unit: str) -> None:
        event = accepted(analyte=analyte, loinc=loinc, unit=unit, value=1)
        assert (analyte, loinc) == (event.analyte, event.loinc)

    @pytest.mark.parametrize(("analyte", "loinc", "unit"), FOREIGN_LOINC, ids=[f"{a}-{c}" for a, c, _ in FOREIGN_LOINC])
    def test_code_of_another_analyte_rejected(self, analyte: str, loinc: str, unit: str) -> None:
        result = decode(LABS, lab(analyte=analyte, loinc=loinc, unit=unit))
        assert isinstance(result, Rejection), f"accepted: {result!r}"
        expected = ("invalid_value", True, EVENT_ID)
        assert expected == (result.reason, "loinc" in result.detail, result.event_id)

    def test_loinc_is_optional(self) -> None:
        assert accepted().loinc is None
