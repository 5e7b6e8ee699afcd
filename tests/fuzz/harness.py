"""A small, deterministic mutation fuzzer: one harness, one surface per attack point.

Each surface turns a `random.Random` into one input (`generate`) and runs the
code under test on it (`check`), which returns an `Outcome`: accepted (with
the sizes of the records it would publish) or refused with a reason. Anything
that escapes `check` is an exception: the surface's defect count, which must
stay 0. `make fuzz` runs every surface at 100,000 inputs; `make test` runs a
bounded number of each (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool
    reason: str = ""
    # Sizes in bytes of every record (or reply) the input produced.
    output_sizes: tuple[int, ...] = ()

    @staticmethod
    def ok(*sizes: int) -> Outcome:
        return Outcome(True, "", tuple(sizes))

    @staticmethod
    def refused(reason: str, *sizes: int) -> Outcome:
        return Outcome(False, reason, tuple(sizes))


@dataclass(frozen=True, slots=True)
class Surface:
    name: str
    generate: Callable[[random.Random], Any]
    check: Callable[[Any], Outcome]
    # Called once before the run (e.g. to start a listener); its return is ignored.
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None


@dataclass(slots=True)
class Tally:
    surface: str
    inputs: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    exceptions: list[str] = field(default_factory=list)
    largest_output: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.refused.most_common(6))
        more = len(self.refused) - 6
        if more > 0:
            reasons += f", +{more} more"
        return (
            f"{self.surface:<10} inputs {self.inputs:>7,}  accepted {self.accepted:>7,}  "
            f"refused {sum(self.refused.values()):>7,}  exceptions {len(self.exceptions):>3}  "
            f"largest output {self.largest_output:>9,} B  {self.seconds:6.1f} s\n"
            f"{'':<10} refused by reason: {reasons or '-'}"
        )


class LogLeakWatch(logging.Handler):
    """Counts log records (any logger, any level) whose message contains one of `needles`.

    A surface calls `start()` in its setup and `stop()` in its teardown, and
    compares `seen` before and after each input: a record number in a log is a defect.
    """

    def __init__(self, *needles: str) -> None:
        super().__init__(logging.DEBUG)
        self.needles = needles
        self.seen = 0
        self._root_levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(needle in message for needle in self.needles):
            self.seen += 1

    def start(self) -> None:
        root = logging.getLogger()
        self._root_levels.append(root.level)
        root.setLevel(logging.DEBUG)
        root.addHandler(self)

    def stop(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._root_levels.pop())


def excerpt(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def run(surface: Surface, inputs: int, seed: int = 0) -> Tally:
    """Feed `inputs` generated inputs to the surface; never raises for a defect, records it."""
    tally = Tally(surface.name)
    rng = random.Random(f"{surface.name}:{seed}")
    started = time.perf_counter()
    if surface.setup is not None:
        surface.setup()
    try:
        for _ in range(inputs):
            value = surface.generate(rng)
            tally.inputs += 1
            try:
                outcome = surface.check(value)
            except Exception as exc:  # noqa: BLE001 - an exception is exactly what the fuzzer looks for
                tb = "".join(traceback.format_exception(exc, limit=-4))
                tally.exceptions.append(f"{excerpt(value)}\n{tb}")
                continue
            if outcome.accepted:
                tally.accepted += 1
            else:
                tally.refused[outcome.reason] += 1
            if outcome.output_sizes:
                tally.largest_output = max(tally.largest_output, *outcome.output_sizes)
    finally:
        if surface.teardown is not None:
            surface.teardown()
    tally.seconds = time.perf_counter() - started
    return tally


# ---------------------------------------------------------------------------
# Hostile values: what a messy hospital system or an attacker puts in a field.

HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\t\n",
    "\x00",
    "\x1b[31mred",
    "a\u202eb",  # right-to-left override
    "\ud7ff",
    "é" * 3,
    "x" * 129,
    "x" * 5_000,
    "1e309",
    "NaN",
    "null",
    "-0",
    "2025-03-01",
    "2025-03-01T10:00:00",
    "0001-01-01T00:00:00+00:00",
    "9999-12-31T23:59:59+00:00",
    "2025-03-01T10:00:00-23:59",
    "2025-13-45T99:99:99Z",
    "sbrt",
    "control",
    "MRN8675309",
    "\\",
    '"',
    "{}",
)

HOSTILE_NUMBERS: tuple[Any, ...] = (
    0,
    -0.0,
    -1,
    1e-30,
    5e-324,
    1e30,
    1.7976931348623157e308,
    10**400,
    -(10**40),
    0.1,
    2**53 + 1,
    2**63,
    True,
    False,
    1.5,
    20,
    999_999,
)


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, biased towards the ones that break parsers and arithmetic."""
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(HOSTILE_STRINGS)
    if roll < 0.7:
        return rng.choice(HOSTILE_NUMBERS)
    if roll < 0.78:
        return None
    if roll < 0.86 or depth > 2:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.94:
        return {rng.choice(HOSTILE_STRINGS)[:8]: hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(("x" * rng.randint(10_000, 700_000), [[]] * rng.randint(1, 50)))


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A byte-level mutation: flip, insert, delete, duplicate or truncate."""
    if not data:
        return bytes([rng.randrange(256)])
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) or 1)
        if op == 0 and buf:
            buf[pos] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3 and buf:
            chunk = buf[pos : pos + rng.randint(1, 64)]
            buf[pos:pos] = chunk * rng.randint(1, 50)
        elif op == 4:
            buf = buf[: rng.randrange(len(buf) + 1)]
        else:
            buf[pos:pos] = rng.choice((b"\x00", b"\r", b"\n", b"\x0b", b"\x1c", b"\\", b"|", b"^", b"~", b"&"))
    return bytes(buf)


def deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice((100, 1_000, 50_000, 100_000))
    opener = rng.choice((b"[", b'{"a":'))
    return opener * depth
