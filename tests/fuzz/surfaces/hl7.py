"""HL7 v2 adapter: mutated ORU^R01 messages through `map_oru` and the ACK it answers with.

The seeds are the unit tests' messages. Each input is a seed with structural
mutations (escape sequences, delimiters, huge fields, bad timestamps, encoding
characters, segments repeated, dropped or swapped), a field replaced by one of
the harness's hostile values, or the seed's bytes mutated. Every message must
be answered AA, AE or AR: an exception, or an AE that owns up to an internal
error, is a defect. Outcome: accepted for AA, else refused with the ACK code
and the kind of reason; the sizes are the ACK's and every event's.

No record number (the seeds' `MRN0...`) may reach a log record; unless a
mutation moved PID text into another segment, none may reach the ACK either.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from tests.fuzz.harness import LogLeakWatch, Outcome, Surface, hostile_value, mutate_bytes
from tests.unit.test_hl7_adapter import MAPPING, OBR, PID, PLATELETS, oru
from trialwatch.adapters.hl7v2 import INTERNAL_ERROR, MAX_SEGMENTS, ack_message, map_oru

# In the seeds' PID-3, and nowhere in the harness's hostile values.
RECORD_NUMBER = "MRN0"
NOW = datetime(2025, 3, 5, 2, 30, tzinfo=UTC)

TIME = "20250305080000+0800"
SEEDS: tuple[str, ...] = (
    oru(PLATELETS),
    oru(PLATELETS, f"OBX|2|NM|6690-2^WBC^LN||4.1|10*9/L|3.5-9.5|N|||F|||{TIME}", control="S2"),
    oru(f"OBX|1|NM|1975-2^Bilirubin total^LN||3.2|mg/dl|0.1-1.2|H|||F|||{TIME}", control="S3"),
    oru(f"OBX|1|NM|1742-6^ALT^LN||250|U/L|<40|H|||F|||{TIME}", control="S4"),
    oru("OBX|1|NM|PLT^Plt^L||42|10\\S\\3/uL|||||P|||202503050930", control="S5", mrn="MRN0002"),
    oru(PLATELETS, f"OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F|||{TIME}", control="S6"),
    oru(f"OBX|1|SN|777-3^Platelets^LN||=^20|10*9/L|125-350|LL|||C|||{TIME}", control="S7"),
    oru(PLATELETS.replace("|F|", "|X|"), control="S8"),
    "\r".join([oru(PLATELETS, control="S9"), PID.format(mrn="MRN0002"), OBR, PLATELETS]),
)

_COUNTS = ("", "1", "9", "-4", "+3", "1024", "1025", "50000000", "99999999999999999999", "Z", " 5", "5_0", "٣")
_ESCAPES = (
    *(f"\\{cmd}{n}\\" for cmd in (".sp", ".in", ".ti", ".sk", ".br", ".ce") for n in _COUNTS),
    "\\.fi\\",
    "\\.nf\\",
    "\\.xx\\",
    "\\X32\\",
    "\\X3230\\",
    "\\X\\",
    "\\XZZ\\",
    "\\X3\\",
    "\\XFFFE\\",
    "\\Z\\",
    "\\Zlocal\\",
    "\\C2842\\",
    "\\M2442\\",
    "\\\\",
    "\\",
    "\\E\\",
    "\\F\\",
    "\\R\\",
    "\\S\\",
    "\\T\\",
    "\\H\\",
    "\\N\\",
)
_TIMES = (
    "20250305103000+2400",
    "20250305103000-2400",
    "20250305080000-2500",
    "20250305080000+0860",
    "20250305080000+1400",
    "20250305080000-1200",
    "20250305080000+9999",
    "20250305080000-0000",
    "2025",
    "202503",
    "2025030508",
    "202503050800",
    "20250231080000+0800",
    "00000101000000+0000",
    "00010101000000+0000",
    "99991231235959+1400",
    "20250305080000.12345+0800",
    "20250305080000.1+0800",
    "20250305246000+0800",
    "20250305080000+08",
    "２０２５０３０５０８００+0800",
    "20250305080000Z",
)
_NUMBERS = ("1e309", "NaN", "inf", "-0", "0", ".5", "5.", "+20", "1" * 400, "20 ", " 20", "0x14", "2,0", "٢٠")
_DELIMITERS = ("|", "^", "~", "&", "\\", "\r", "\n", "\r\n", "\x0b", "\x1c", "\x1c\r", "\x00", "\t")
_ENCODINGS = ("", "^", "^~", "^~\\", "^~\\&#", "^~\\&\\", "||||", "\\\\\\\\", "^^^^", "~^\\&", "^~&\\", "ab\\c")
_HUGE = ("9", "x", "^", "~", "&", "|", "\\E\\", "\\.br\\", "\r", "é")


@dataclass(frozen=True)
class Case:
    text: str
    # Whether a record number in the ACK is a leak (see the module docstring).
    check_leaks: bool


def generate(rng: random.Random) -> Case:
    seed = rng.choice(SEEDS)
    roll = rng.random()
    if roll < 0.1:
        return Case(seed, check_leaks=True)
    if roll < 0.7:
        text, moved = seed, False
        for _ in range(rng.randint(1, 3)):
            text, moved_now = _structural(rng, text)
            moved = moved or moved_now
        return Case(text, check_leaks=not moved)
    if roll < 0.85:
        return Case(_set_field(rng, seed, str(hostile_value(rng))), check_leaks=True)
    data = mutate_bytes(rng, seed.encode())
    return Case(data.decode("utf-8", rng.choice(("replace", "surrogateescape", "ignore"))), check_leaks=False)


def _structural(rng: random.Random, text: str) -> tuple[str, bool]:
    """One structural mutation; True when PID text may have moved into another segment."""
    roll = rng.random()
    if roll < 0.3:
        return _set_field(rng, text, _escaped(rng)), False
    if roll < 0.42:
        return _set_field(rng, text, rng.choice(_TIMES), prefer=(("MSH", 7), ("OBX", 14), ("OBR", 7))), False
    if roll < 0.5:
        return _set_field(rng, text, rng.choice(_NUMBERS), prefer=(("OBX", 5), ("OBX", 7))), False
    if roll < 0.58:
        return _set_field(rng, text, _huge(rng)), False
    if roll < 0.66:
        return _insert(rng, text, rng.choice(_DELIMITERS)), True
    if roll < 0.72:
        encoding = rng.choice(_ENCODINGS)
        return text.replace("MSH|^~\\&|", f"MSH|{encoding}|", 1), True
    if roll < 0.9:
        return _segments(rng, text)
    if roll < 0.95:
        return text.replace("\r", rng.choice(("\n", "\r\n", "\r\r", "\n\n"))), False
    return text.replace("|", rng.choice(("#", "^", "\\", " ")), 1), True


def _escaped(rng: random.Random) -> str:
    sequence = rng.choice(_ESCAPES)
    return rng.choice((sequence, f"2{sequence}0", f"20{sequence}", sequence * rng.randint(2, 300), f"MRN9{sequence}"))


def _huge(rng: random.Random) -> str:
    size = rng.choice((100, 5_000, 60_000, 300_000, 1_100_000))
    return rng.choice(_HUGE) * (size // 2 if rng.random() < 0.5 else size)


def _set_field(rng: random.Random, text: str, value: str, prefer: tuple[tuple[str, int], ...] = ()) -> str:
    """The message with one field (or one component of it) replaced by `value`."""
    segments = text.split("\r")
    # Among the first segments only: a mutated message may have thousands.
    candidates = [(i, n) for i, s in enumerate(segments[:50]) for name, n in prefer if s.startswith(name)]
    if candidates and rng.random() < 0.8:
        index, number = rng.choice(candidates)
    else:
        index = rng.randrange(len(segments))
        number = rng.randint(1, 16)
    fields = segments[index].split("|")
    # MSH-1 is the separator itself: MSH-n is fields[n - 1]; elsewhere fields[n].
    position = number - 1 if segments[index].startswith("MSH") else number
    if position < 1:
        position = 1
    while len(fields) <= position:
        fields.append("")
    if rng.random() < 0.3 and "^" in fields[position]:
        components = fields[position].split("^")
        components[rng.randrange(len(components))] = value
        fields[position] = "^".join(components)
    else:
        fields[position] = value
    segments[index] = "|".join(fields)
    return "\r".join(segments)


def _insert(rng: random.Random, text: str, what: str) -> str:
    at = rng.randrange(len(text) + 1)
    return text[:at] + what * rng.choice((1, 1, 2, 50, 5_000)) + text[at:]


def _segments(rng: random.Random, text: str) -> tuple[str, bool]:
    segments = text.split("\r")
    index = rng.randrange(len(segments))
    roll = rng.random()
    if roll < 0.45:
        # Mostly a few; now and then just under, at and over the budget.
        count = rng.choice((2, 3, 10, 50, 200)) if rng.random() < 0.995 else rng.choice((MAX_SEGMENTS - 10, 10_000))
        # A huge segment repeated: no more than about 2 MB in all.
        count = min(count, 2_000_000 // (len(segments[index]) + 1) + 1)
        segments[index + 1 : index + 1] = [segments[index]] * count
        return "\r".join(segments), False
    if roll < 0.6 and len(segments) > 1:
        del segments[index]
        return "\r".join(segments), False
    if roll < 0.75:
        other = rng.randrange(len(segments))
        segments[index], segments[other] = segments[other], segments[index]
        return "\r".join(segments), False
    if roll < 0.85:
        segments.insert(index, rng.choice(("ZZZ|1|x", "NTE|1||comment", "", " ", "MSH|^~\\&|X", "PID", "OBX")))
        return "\r".join(segments), False
    # Renamed: the fields of one segment read as another's (a PID read as OBX can quote PID-3).
    segments[index] = rng.choice(("OBX", "OBR", "PID", "MSH", "obx", "OB")) + segments[index][3:]
    return "\r".join(segments), True


LEAKS = LogLeakWatch(RECORD_NUMBER, "MRN9")


def check(case: Case) -> Outcome:
    logged = LEAKS.seen
    outcome = map_oru(case.text, MAPPING)
    ack = ack_message(outcome, NOW)
    if LEAKS.seen != logged:
        raise AssertionError("a log record carries a record number")
    if outcome.reason.startswith(INTERNAL_ERROR):
        raise AssertionError(f"the mapping failed: {outcome.reason}")
    if case.check_leaks and RECORD_NUMBER in ack:
        raise AssertionError(f"a record number in the ACK: {ack[:300]!r}")
    msa = ack.split("\r")[1].split("|")
    if len(msa) != 4 or msa[1] != outcome.ack_code:
        raise AssertionError(f"not one MSA segment of 4 fields: {ack[:300]!r}")
    sizes = [len(ack.encode("utf-8", "replace"))] + [len(e.model_dump_json().encode()) for e in outcome.events]
    if outcome.ack_code == "AA":
        return Outcome.ok(*sizes)
    return Outcome.refused(f"{outcome.ack_code} {category(outcome.reason)}", *sizes)


def category(reason: str) -> str:
    """The reason without what it quotes of the input, so that refusals tally by kind."""
    reason = re.sub(r"^OBX [^:]*: ", "", reason)
    return re.sub(r"\b\d[\d,]*", "N", re.split(r"[(;'\"]", reason, maxsplit=1)[0]).strip()[:60]


SURFACE = Surface("hl7", generate, check, LEAKS.start, LEAKS.stop)
