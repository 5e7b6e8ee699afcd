"""The contract's rule catalogue v1 (events-v1.md, "Rule catalogue v1"), as the tests expect it."""

from __future__ import annotations

CATALOGUE = frozenset(
    {
        "lab.platelets.low",
        "lab.bilirubin.high",
        "lab.ctcae.grade3plus",
        "ae.grade3plus",
        "ae.serious",
        "sbrt.window.at_risk",
        "sbrt.window.missed",
        "protocol.crossover",
        "protocol.systemic_held_during_sbrt",
        "protocol.regimen_mismatch",
        "rild.suspected",
        "recist.progression",
        "eligibility.violation",
        "dsmb.toxicity_boundary",
    }
)
