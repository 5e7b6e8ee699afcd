"""Every fuzzed surface. Each module defines `SURFACE`; add new ones to `_MODULES`."""

from __future__ import annotations

import importlib

from tests.fuzz.harness import Surface

_MODULES = ("events", "hl7", "fhir", "mllp", "dsmb_api")


def all_surfaces() -> list[Surface]:
    out = []
    for name in _MODULES:
        try:
            module = importlib.import_module(f"tests.fuzz.surfaces.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tests.fuzz.surfaces.{name}":
                continue  # not written yet
            raise
        out.append(module.SURFACE)
    return out
