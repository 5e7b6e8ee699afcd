"""FHIR R4 adapter: mutated Observations, AdverseEvents, Bundles and NDJSON through `map_fhir`.

Every document must come back as outcomes (published or refused with a
reason); the sizes reported are those of the event records that would be
published. Structurally mutated documents also check that no record number
(the seeds' `MRN0...` identifiers) reaches a refusal, a location, an event or
a log record. Byte-mutated ones skip that check: a duplicated chunk can move a
record number into a field whose value a refusal quotes.
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from tests.fuzz.harness import LogLeakWatch, Outcome, Surface, deep_nesting, hostile_value, mutate_bytes
from tests.unit.test_fhir_adapter import ADVERSE_EVENT, OBSERVATION
from tests.unit.test_hl7_adapter import MAPPING
from trialwatch.adapters.fhir_r4 import map_fhir

# In the seeds, and nowhere in the harness's hostile values.
RECORD_NUMBER = "MRN0"

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "urn:hospital:mrn", "value": "MRN0002"}],
}
BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {"fullUrl": "urn:uuid:0f9a7c34-0000-4000-8000-000000000001", "resource": PATIENT},
        {"resource": {**OBSERVATION, "subject": {"reference": "urn:uuid:0f9a7c34-0000-4000-8000-000000000001"}}},
        {"resource": {**ADVERSE_EVENT, "subject": {"reference": "Patient/p1"}}},
        {"resource": {**OBSERVATION, "id": "obs-2", "subject": {"reference": "Patient/MRN0999"}}},
    ],
}
SEEDS: tuple[dict[str, Any], ...] = (OBSERVATION, ADVERSE_EVENT, BUNDLE)

# Values that cannot be built as Python objects and serialised (json.dumps
# would recurse, or refuse the integer): a sentinel string, replaced in the text.
_SENTINEL = re.compile(r'"@@(NEST|NUM|DUP):(\d+|[A-Za-z]+)@@"')


@dataclass(frozen=True)
class Case:
    data: str | bytes
    # Whether a record number in any output is a leak (see the module docstring).
    check_leaks: bool


def generate(rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.55:
        return Case(_text(_mutated(rng, rng.choice(SEEDS))), check_leaks=True)
    if roll < 0.72:
        return Case(_ndjson(rng), check_leaks=True)
    if roll < 0.95:
        data = mutate_bytes(rng, json.dumps(rng.choice(SEEDS), indent=rng.choice((None, 2))).encode())
        # As the command reads a file (bytes), or as text from a caller that
        # decoded it leniently (U+FFFD, or lone surrogates for the bad bytes).
        errors = rng.choice(("bytes", "bytes", "replace", "surrogateescape"))
        return Case(data if errors == "bytes" else data.decode("utf-8", errors), check_leaks=False)
    return Case(deep_nesting(rng), check_leaks=True)


def _ndjson(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.random()
        if kind < 0.5:
            lines.append(_text(rng.choice(SEEDS[:2])))
        elif kind < 0.85:
            lines.append(_text(_mutated(rng, rng.choice(SEEDS))))
        else:
            lines.append(deep_nesting(rng).decode())
    return rng.choice(("\n", "\r\n", "\n\n")).join(lines)


def _text(doc: Any) -> str:
    return _SENTINEL.sub(_expand, json.dumps(doc))


def _expand(match: re.Match[str]) -> str:
    kind, arg = match.group(1), match.group(2)
    if kind == "NEST":
        return "[" * int(arg) + "]" * int(arg)
    if kind == "NUM":
        return "9" * int(arg)
    return f'"{arg}"'  # DUP: the key again, so the object holds it twice


def _mutated(rng: random.Random, seed: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(seed)
    for _ in range(rng.randint(1, 3)):
        slots = list(_slots(doc))
        parent, key = rng.choice(slots)
        _mutate_slot(rng, parent, key)
    return doc


def _slots(node: Any) -> Any:
    """Every (container, key) pair of the document, the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in list(items):
        yield node, key
        yield from _slots(child)


def _mutate_slot(rng: random.Random, parent: Any, key: Any) -> None:
    op = rng.randrange(8)
    if op == 0 or op == 1:
        parent[key] = hostile_value(rng)
    elif op == 2:
        del parent[key]
    elif op == 3:
        value = parent[key]
        parent[key] = rng.choice(([value], {"value": value}, str(value), 5))
    elif op == 4:
        parent[key] = f"@@NEST:{rng.choice((10, 40, 63, 64, 65, 200, 5_000))}@@"
    elif op == 5:
        parent[key] = rng.choice((f"@@NUM:{rng.choice((18, 40, 41, 400, 5_000))}@@", 1e308, -1e308, 10**30))
    elif op == 6:
        parent[key] = " " * rng.randint(0, 1) + "x" * rng.choice((199, 200, 201, 5_000, 600_000))
    elif isinstance(parent, dict):
        parent[f"@@DUP:{key}@@"] = hostile_value(rng)
    else:
        parent.append(copy.deepcopy(parent[key]))


_LEAKS = LogLeakWatch(RECORD_NUMBER)


def check(case: Case) -> Outcome:
    logged = _LEAKS.seen
    outcomes = map_fhir(case.data, MAPPING)
    events = [o.event.model_dump_json(exclude_unset=True) for o in outcomes if o.event is not None]
    if _LEAKS.seen != logged:
        raise AssertionError("a log record carries a record number")
    if case.check_leaks:
        shown = [f"{o.where} {o.reason}" for o in outcomes] + events
        leaked = [text[:200] for text in shown if RECORD_NUMBER in text]
        if leaked:
            raise AssertionError(f"a record number in the output: {leaked}")
    sizes = [len(event.encode()) for event in events]
    refused = [o.reason for o in outcomes if o.rejected]
    if refused:
        return Outcome.refused(_category(refused[0]), *sizes)
    if not outcomes:
        return Outcome.refused("no resource", *sizes)
    return Outcome.ok(*sizes)


def _category(reason: str) -> str:
    """The reason without what it quotes of the input, so that refusals tally by kind."""
    return re.sub(r"\b\d[\d,]*", "N", re.split(r"[:(;'\"]", reason, maxsplit=1)[0]).strip()[:60]


SURFACE = Surface("fhir", generate, check, _LEAKS.start, _LEAKS.stop)
