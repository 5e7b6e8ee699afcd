"""The adapter mapping file: hospital identifiers to subject codes, local lab codes to analytes.

The file holds hospital record numbers. They are looked up here and nowhere
else: no event, log line, error or ACK the adapters produce carries one.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trialwatch.units import ANALYTE_LOINC, Analyte

# Every LOINC code the contract knows, to the analyte it measures.
ANALYTE_BY_LOINC: dict[str, str] = {code: analyte for analyte, codes in ANALYTE_LOINC.items() for code in codes}


class MappingFileError(ValueError):
    """The mapping file cannot be used; the message names the problem, never an identifier in it."""


class AmbiguousSubject(ValueError):
    """The patient's identifiers map to more than one subject code."""


class AdapterMapping(BaseModel):
    """One site's mapping, as read from its TOML file (README, "Publishing from HL7 v2 / FHIR")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: Annotated[str, Field(min_length=1, max_length=64)]
    source: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # hospital identifier (MRN) -> pseudonymous subject code
    subjects: dict[str, Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=dict)
    # local (non-LOINC) observation code -> analyte
    local_codes: dict[str, Analyte] = Field(default_factory=dict)
    # Codes of results the trial does not monitor (sodium, glucose, ...): a
    # message that carries them is accepted and they are counted as ignored.
    # Anything neither mapped nor listed here is an error, so that a new LIS
    # code for platelets is never silently left out.
    ignore_codes: frozenset[str] = frozenset()

    def subject_for(self, identifiers: Iterable[str]) -> str | None:
        """The subject code of a patient known by these identifiers, or None when none is mapped."""
        found = {self.subjects[i] for i in identifiers if i in self.subjects}
        if len(found) > 1:
            raise AmbiguousSubject("the patient's identifiers map to more than one subject code")
        return found.pop() if found else None

    def analyte_for(self, code: str, is_loinc: bool) -> str | None:
        if is_loinc:
            return ANALYTE_BY_LOINC.get(code)
        return self.local_codes.get(code)

    def ignores(self, code: str) -> bool:
        return code in self.ignore_codes


def load_mapping(path: Path) -> AdapterMapping:
    """Read and check a mapping file; raise `MappingFileError` with a reason that names no identifier."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise MappingFileError(f"cannot read mapping file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MappingFileError(f"mapping file {path} is not valid TOML: {exc}") from None
    try:
        return AdapterMapping.model_validate(raw)
    except ValidationError as exc:
        # Locations only: under [subjects] a location is itself a record number.
        problems = "; ".join(
            f"{_where(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False, include_input=False)
        )
        raise MappingFileError(f"mapping file {path}: {problems}") from None


def _where(loc: tuple[int | str, ...]) -> str:
    if loc and loc[0] == "subjects":
        return "subjects (an entry)"
    return ".".join(str(p) for p in loc) or "(file)"
