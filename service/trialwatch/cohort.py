"""`trialwatch seed`: a deterministic synthetic cohort, realistic enough to exercise every rule.

No real patient data: subjects are generated codes, values are drawn from
plausible ranges for HCC patients on second-line therapy in Chinese
hospitals (SI units: µmol/L bilirubin and creatinine, g/L albumin and
haemoglobin). The same seed always gives the same file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

SITE_TZ = timezone(timedelta(hours=8))
SITES = ("SITE-GZ", "SITE-SZ", "SITE-FS", "SITE-ZS")
FIRST_LINE = ("atezolizumab+bevacizumab", "sintilimab+bevacizumab", "lenvatinib", "lenvatinib+pd1")
SECOND_LINE = {
    "atezolizumab+bevacizumab": ("lenvatinib", "regorafenib"),
    "sintilimab+bevacizumab": ("lenvatinib", "regorafenib"),
    "lenvatinib": ("regorafenib+pd1",),
    "lenvatinib+pd1": ("regorafenib+pd1",),
}
# Site reference ranges (low, high) in the unit each lab reports.
RANGES = {
    "platelets": (125, 350, "10*9/L", "777-3"),
    "wbc": (3.5, 9.5, "10*9/L", "6690-2"),
    "neutrophils": (1.8, 6.3, "10*9/L", "751-8"),
    "hemoglobin": (130, 175, "g/L", "718-7"),
    "albumin": (40, 55, "g/L", "1751-7"),
    "total_bilirubin": (3.4, 20.5, "umol/L", "14631-6"),
    "alt": (9, 50, "U/L", "1742-6"),
    "ast": (15, 40, "U/L", "1920-8"),
    "alp": (45, 125, "U/L", "6768-6"),
    "creatinine": (57, 111, "umol/L", "14682-9"),
    "inr": (0.8, 1.2, "{INR}", "6301-6"),
}
AE_TERMS = ("Fatigue", "Diarrhea", "Hypertension", "Palmar-plantar erythrodysesthesia syndrome", "Anorexia")


@dataclass
class _Subject:
    code: str
    site: str
    rng: random.Random
    events: list[tuple[datetime, str, dict[str, Any]]] = field(default_factory=list)
    n: int = 0

    def emit(self, at: datetime, topic: str, **value: Any) -> None:
        self.n += 1
        body = {
            "event_id": f"{self.code}-{self.n:03d}",
            "subject_id": self.code,
            "site_id": self.site,
            "occurred_at": at.isoformat(),
            **value,
        }
        self.events.append((at, topic, body))

    def lab(self, at: datetime, analyte: str, value: float, **extra: Any) -> None:
        low, high, unit, loinc = RANGES[analyte]
        self.emit(
            at,
            "trial.labs.v1",
            analyte=analyte,
            loinc=loinc,
            value=round(value, 2),
            unit=unit,
            ref_low=low,
            ref_high=high,
            **extra,
        )


def _at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), SITE_TZ)


def _baseline(rng: random.Random) -> dict[str, float]:
    """Screening values of an HCC patient fit for second-line therapy (Child-Pugh A, mild cytopenias)."""
    return {
        "platelets": rng.uniform(80, 220),
        "wbc": rng.uniform(3.2, 7.5),
        "neutrophils": rng.uniform(1.6, 4.5),
        "hemoglobin": rng.uniform(100, 150),
        "albumin": rng.uniform(32, 44),
        "total_bilirubin": rng.uniform(8, 26),
        "alt": rng.uniform(20, 80),
        "ast": rng.uniform(25, 90),
        "alp": rng.uniform(70, 200),
        "creatinine": rng.uniform(55, 100),
        "inr": rng.uniform(0.95, 1.3),
    }


def _subject(index: int, enrolled: date, rng: random.Random, safety_rate: float) -> _Subject:
    s = _Subject(code=f"TWS-{index:04d}", site=rng.choice(SITES), rng=rng)
    arm = rng.choice(("sbrt", "control"))
    first = rng.choice(FIRST_LINE)
    base = _baseline(rng)
    enrol_at = _at(enrolled, 9)

    # Screening labs a few days before enrolment; now and then one outside the inclusion criteria.
    screening_day = enrolled - timedelta(days=rng.randint(2, 10))
    for analyte, value in base.items():
        if analyte == "albumin" and rng.random() < 0.02:
            value = rng.uniform(24, 27.5)
        s.lab(_at(screening_day, 7, 30), analyte, value)
    s.emit(
        enrol_at,
        "trial.enrollment.v1",
        arm=arm,
        first_line_regimen=first,
        age_years=min(80, max(30, round(rng.gauss(58, 9)))),
        kps=rng.choices((70, 80, 90, 100), weights=(2, 30, 50, 18))[0],
        child_pugh_score=rng.choices((5, 6, 7, 8), weights=(40, 40, 17, 3))[0],
    )

    # Second-line start, following the stipulation (rarely not).
    start_day = enrolled + timedelta(days=rng.randint(1, 5))
    start_at = _at(start_day, 10)
    regimen = rng.choice(SECOND_LINE[first])
    if rng.random() < 0.02:
        regimen = rng.choice(
            [r for r in ("lenvatinib", "regorafenib", "regorafenib+pd1") if r not in SECOND_LINE[first]]
        )
    s.emit(start_at, "trial.treatment.v1", kind="second_line_start", regimen=regimen)

    # SBRT: mostly on time, some late, a few never; control: salvage after progression, rare crossover.
    course_day: date | None = None
    if arm == "sbrt":
        delay = rng.choices(
            (rng.randint(3, 9), rng.randint(11, 14), rng.randint(15, 20), None), weights=(83, 10, 5, 2)
        )[0]
        course_day = start_day + timedelta(days=delay) if delay is not None else None
    else:
        if rng.random() < 0.25:
            withdrawn = start_day + timedelta(days=rng.randint(60, 110))
            s.emit(_at(withdrawn, 11), "trial.treatment.v1", kind="withdrawal", reason="progression")
            if rng.random() < 0.5:
                course_day = withdrawn + timedelta(days=rng.randint(5, 15))
        elif rng.random() < 0.03:
            course_day = start_day + timedelta(days=rng.randint(20, 40))
    if course_day is not None:
        fractions = rng.randint(3, 5)
        held = rng.random() < 0.04
        for k in range(fractions):
            s.emit(
                _at(course_day + timedelta(days=k), 14),
                "trial.treatment.v1",
                kind="sbrt_fraction",
                fraction=k + 1,
                dose_gy=rng.choice((8.0, 9.0, 10.0, 12.0)),
            )
            if held and k == 1:
                s.emit(_at(course_day + timedelta(days=k), 16), "trial.treatment.v1", kind="systemic_held")
        end = course_day + timedelta(days=fractions - 1)
        s.emit(_at(end, 17), "trial.treatment.v1", kind="sbrt_completed")
        if held:
            s.emit(_at(end + timedelta(days=3), 9), "trial.treatment.v1", kind="systemic_resumed")

    # Labs every two weeks for 16 weeks, drifting; a share of subjects has a safety event.
    troubled = rng.random() < safety_rate
    trouble = rng.choice(("platelets", "bilirubin", "neutrophils", "alt", "rild")) if troubled else None
    for visit in range(1, 9):
        day = start_day + timedelta(days=14 * visit)
        drift = 1 + rng.gauss(0, 0.08)
        values = {analyte: value * drift for analyte, value in base.items()}
        if trouble == "platelets" and visit in (3, 4):
            values["platelets"] = rng.uniform(15, 49) if visit == 3 else rng.uniform(40, 90)
        if trouble == "bilirubin" and visit == 4:
            values["total_bilirubin"] = rng.uniform(35, 120)
        if trouble == "neutrophils" and visit == 2:
            values["neutrophils"] = rng.uniform(0.3, 0.95)
        if trouble == "alt" and visit == 5:
            values["alt"] = rng.uniform(260, 600)
        if trouble == "rild" and course_day is not None and visit == 4:
            values["alp"] = rng.uniform(260, 500)
        for analyte in ("platelets", "neutrophils", "wbc", "hemoglobin", "total_bilirubin", "alt", "ast", "alp"):
            s.lab(_at(day, 7, 30), analyte, values[analyte])
        if visit % 2 == 0:
            for analyte in ("albumin", "creatinine", "inr"):
                s.lab(_at(day, 7, 30), analyte, values[analyte])

    # Scans: baseline before the start, then every 8 weeks; lesions grow or shrink.
    lesions = {f"L{k}": rng.uniform(15, 48) for k in range(1, rng.randint(1, 3) + 1)}
    trend = rng.choice((0.65, 0.85, 1.0, 1.3))
    for visit in range(3):
        day = start_day - timedelta(days=5) if visit == 0 else start_day + timedelta(days=56 * visit)
        factor = 1.0 if visit == 0 else trend**visit
        items: list[dict[str, Any]] = [
            {"lesion_id": lid, "organ": "liver", "role": "target", "diameter_mm": round(d * factor, 1)}
            for lid, d in lesions.items()
        ]
        if visit == 2 and trend > 1 and rng.random() < 0.5:
            items.append({"lesion_id": "N1", "organ": "lung", "role": "new", "diameter_mm": 8.0})
        s.emit(
            _at(day, 11),
            "trial.scans.v1",
            scan_id=f"{s.code}-S{visit}",
            timepoint="baseline" if visit == 0 else "follow_up",
            modality=rng.choice(("CT", "MRI")),
            lesions=items,
        )

    # Adverse events: grade >= 3 treatment-related AEs are common on second-line regorafenib or
    # lenvatinib (around half of patients in their pivotal trials); some serious, some updated later.
    for k in range(rng.choices((0, 1, 2, 3), weights=(20, 40, 25, 15))[0]):
        onset = start_day + timedelta(days=rng.randint(3, 100))
        grade = rng.choices((1, 2, 3, 4), weights=(35, 35, 24, 6))[0]
        ae_id = f"{s.code}-AE{k + 1}"
        attribution = rng.choice(("unlikely", "possible", "probable", "definite"))
        report = {
            "ae_id": ae_id,
            "term": rng.choice(AE_TERMS),
            "grade": grade,
            "serious": grade >= 3 and rng.random() < 0.3,
            "attribution": attribution,
            "attributed_to": ["systemic"] if arm == "control" else [rng.choice(("systemic", "sbrt"))],
            "recorded_at": _at(onset + timedelta(days=rng.randint(0, 2)), 15).isoformat(),
        }
        s.emit(_at(onset, 13), "trial.adverse-events.v1", **report)
        if rng.random() < 0.1:
            report = {
                **report,
                "grade": min(5, grade + 1),
                # A fatal adverse event is serious by definition (the contract refuses it otherwise).
                "serious": report["serious"] or grade + 1 >= 5,
                "recorded_at": _at(onset + timedelta(days=4), 10).isoformat(),
            }
            s.emit(_at(onset, 13), "trial.adverse-events.v1", **report)
    return s


def generate(subjects: int, seed: int, start: date, until: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Event-file lines for `subjects` subjects enrolled from `start`, in clinical-time order.

    With `until`, the cohort as it stands at that moment: later events are left
    out (the same seed gives the same subjects whatever `until` is).
    """
    rng = random.Random(seed)
    events: list[tuple[datetime, int, str, dict[str, Any]]] = []
    enrolled = start
    for index in range(1, subjects + 1):
        enrolled += timedelta(days=rng.choice((0, 0, 1, 1, 2, 3)))
        subject = _subject(index, enrolled, random.Random(rng.getrandbits(64)), safety_rate=0.15)
        events += [(at, len(events) + i, topic, body) for i, (at, topic, body) in enumerate(subject.events)]
    events.sort(key=lambda e: (e[0], e[1]))
    for at, _, topic, body in events:
        if until is not None and at > until:
            break
        yield {"topic": topic, "value": body}


def write(subjects: int, seed: int, start: date, until: datetime | None = None) -> Iterator[str]:
    for line in generate(subjects, seed, start, until):
        yield json.dumps(line, ensure_ascii=False) + "\n"
