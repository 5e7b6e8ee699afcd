"""The bounded part of the fuzz suite, in `make test`: every surface, no exception, bounded output.

`make fuzz` runs the same surfaces at 100,000 inputs each.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz.harness import run
from tests.fuzz.surfaces import all_surfaces

# Kafka's default max.message.bytes is 1,048,588; every record we produce must fit well under it.
MAX_OUTPUT_BYTES = 1_000_000
INPUTS = int(os.environ.get("TRIALWATCH_FUZZ_INPUTS", "3000"))


@pytest.mark.parametrize("surface", all_surfaces(), ids=lambda s: s.name)
def test_surface_survives_hostile_input(surface) -> None:  # type: ignore[no-untyped-def]
    tally = run(surface, INPUTS, seed=int(os.environ.get("TRIALWATCH_FUZZ_SEED", "0")))
    print(tally.line())
    assert [] == tally.exceptions[:3], f"{len(tally.exceptions)} inputs raised"
    assert tally.largest_output <= MAX_OUTPUT_BYTES
    # A surface that refuses everything is not being exercised.
    assert tally.accepted > 0, tally.line()
