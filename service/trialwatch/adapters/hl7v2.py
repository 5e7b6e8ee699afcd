"""HL7 v2 ORU^R01 to `trial.labs.v1`: a pure mapping from message text to lab events or a rejection.

Parsing is python-hl7's; what a field means for the trial is decided here.
Nothing in this module does I/O: the MLLP listener and the `trialwatch hl7`
command are shells around `map_oru` and `ack_message`.

A message is mapped as a whole: when any OBX cannot be mapped the message is
answered AE and none of its results are published, so the sender fixes and
re-sends one message rather than a remainder.

`map_oru` is total: every message is answered AA, AE or AR, whatever it holds.
python-hl7 is given only messages within a budget of segments and delimiters
(it builds a Python object per delimiter), and its unescaping is not used:
fields are unescaped here, with a bound on how much escape sequences may
expand and a refusal for the sequences python-hl7 would drop, raise on or log
(its log records quote the whole field, PID-3 included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import hl7

from trialwatch.adapters.mapping import AdapterMapping, AmbiguousSubject
from trialwatch.contract import LABS, Lab
from trialwatch.decode import Rejection, decode
from trialwatch.units import ucum

AckCode = Literal["AA", "AE", "AR"]

# MLLP block framing (HL7 v2 Appendix C): start block, end block, carriage return.
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"

# OBX-11 observation result status (HL7 table 0085) to the contract's status.
# Other codes (R, I, D, W, ...) are rejected: guessing what a site means by
# them could keep or drop a result the DSMB must see.
STATUS_BY_OBX11: dict[str, str] = {"P": "preliminary", "F": "final", "C": "corrected", "X": "cancelled"}

# OBX-2 value types that carry one number. SN (structured numeric) only
# without a comparator or range: "<0.5" is not a value the rules can grade.
_NUMERIC_TYPES = frozenset({"NM", "SN"})

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
# HL7 DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]
_DTM = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?P<frac>\.\d{1,4})?(?P<tz>[+-]\d{4})?$"
)
# Reference ranges as labs write them in OBX-7: "125-350", "3.5 - 9.5", "<40", "<=40", ">35".
_RANGE = re.compile(r"^\s*(?P<low>\d+(\.\d+)?)\s*-\s*(?P<high>\d+(\.\d+)?)\s*$")
_UPPER = re.compile(r"^\s*(<|<=|≤)\s*(?P<high>\d+(\.\d+)?)\s*$")
_LOWER = re.compile(r"^\s*(>|>=|≥)\s*(?P<low>\d+(\.\d+)?)\s*$")

# The longest MSH-10 we accept: it becomes part of event ids, which the
# contract caps at 128 characters. Other MSH fields an ACK echoes are cut there too.
MAX_CONTROL_ID = 64

# What python-hl7 is given. It builds Python objects for every delimiter
# (1 MiB of '|' took 450 MiB and 19 s; 10 µs and 450 bytes a delimiter), so a
# message is refused before parsing when it is longer, or has more segments or
# delimiters, than a laboratory sends in one ORU^R01 (a panel is 10 to 50
# segments of about 16 delimiters): at most about 0.25 s and 12 MiB to parse.
MAX_MESSAGE_CHARS = 1 << 20
MAX_SEGMENTS = 1_000
MAX_DELIMITERS = 25_000
# How many characters escape sequences may add to one field (\.in50000000\ in
# python-hl7: 200 million), and how long an MSA-3 reason may be.
MAX_ESCAPE_GROWTH = 1_024
MAX_REASON = 300
# How much of a message is read for the MSH fields an ACK echoes.
HEADER_SCAN = 4_096


@dataclass(frozen=True)
class MessageHeader:
    """The MSH fields an ACK echoes back (none of them identifies a patient)."""

    control_id: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    trigger: str = "R01"


@dataclass(frozen=True)
class OruOutcome:
    """What became of one message: AA with its lab events, or AE/AR with a reason safe to show anyone."""

    header: MessageHeader
    ack_code: AckCode
    events: tuple[Lab, ...] = ()
    reason: str = ""
    ignored: int = 0

    @property
    def control_id(self) -> str:
        return self.header.control_id

    def fingerprint(self) -> str:
        """Identifies the events a message maps to: a re-sent message has the same one."""
        material = json.dumps([e.model_dump(mode="json") for e in self.events], sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()


class _Refused(Exception):
    def __init__(self, code: AckCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _BadField(Exception):
    """A field that cannot be read as text; `problem` never quotes it (it may be PID-3)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _silence_python_hl7() -> None:
    """python-hl7's log records quote whole fields (`Error decoding value [Z], field [MRN...\\Z\\]`): none leaves it.

    Its loggers are named after its files (`logging.getLogger(__file__)`), so
    they are found by that name as well as under `hl7`. A filter on the logger
    itself drops a record before any handler sees it, and logging.config
    leaves filters (and `propagate`) of loggers it is not told about alone.
    """
    package_dir = os.path.dirname(hl7.__file__)
    logging.getLogger("hl7")  # its children, should a later version use __name__
    for name in list(logging.Logger.manager.loggerDict):
        if name == "hl7" or name.startswith(("hl7.", package_dir)):
            logger = logging.getLogger(name)
            logger.addFilter(_DropAll())
            logger.propagate = False


_silence_python_hl7()


def split_messages(text: str) -> list[str]:
    """Messages of a file: MLLP-framed blocks, or plain messages separated by blank lines."""
    if "\x0b" in text:
        blocks = [b.split("\x1c", 1)[0] for b in text.split("\x0b")[1:]]
        return [b.strip("\r\n") for b in blocks if b.strip()]
    messages, current = [], []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            current.append(line.strip())
        elif current:
            messages.append("\r".join(current))
            current = []
    if current:
        messages.append("\r".join(current))
    return messages


# The MSA-3 of a message the mapping failed on: a defect of ours, not of the message.
INTERNAL_ERROR = "internal error of the trialwatch adapter"


def map_oru(text: str, mapping: AdapterMapping) -> OruOutcome:
    """Map one ORU^R01 message to `trial.labs.v1` events (AA), or say why not (AE, AR). Never raises."""
    header = MessageHeader()
    try:
        header = read_header(text)
        message = _parse(text)
        header = _header(message)
        _check_header(message, header)
        events, ignored = _lab_events(message, header, mapping)
    except _Refused as refused:
        return OruOutcome(header, refused.code, reason=_clip(refused.reason))
    except _BadField as bad:
        return OruOutcome(header, "AE", reason=_clip(str(bad)))
    except Exception as exc:  # noqa: BLE001 (total: a defect here must still be answered, and never crash a listener)
        # AE, not AR: re-sending the same message would fail the same way. Only
        # the exception's type is shown; its text may quote a field.
        reason = f"{INTERNAL_ERROR} ({type(exc).__name__}); nothing was published, tell the trial team"
        return OruOutcome(header, "AE", reason=reason)
    return OruOutcome(header, "AA", tuple(events), ignored=ignored)


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


def _normalise(text: str) -> str:
    # Segments end in CR on the wire; files saved on other systems use LF or CRLF.
    return "\r".join(line for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if line.strip())


_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPARSEABLE = "not a parseable HL7 v2 message (check the MSH segment and encoding characters)"


def _parse(text: str) -> hl7.Message:
    if len(text) > MAX_MESSAGE_CHARS:
        raise _Refused("AR", f"message longer than {MAX_MESSAGE_CHARS:,} characters")
    text = _normalise(text)
    if not text.startswith("MSH"):
        raise _Refused("AR", "not an HL7 v2 message: it does not start with an MSH segment")
    if _SURROGATE.search(text):
        # Text decoded with errors="surrogateescape": its events could not be serialised.
        raise _Refused("AR", "message holds bytes that are not characters of its encoding")
    # python-hl7 raises IndexError, ParseException, ... for what it cannot
    # parse; its messages can quote segment text, which may include PID: not shown.
    try:
        separators = hl7.parser.create_parse_plan(text).separators
    except Exception:  # noqa: BLE001 (see above)
        raise _Refused("AR", _UNPARSEABLE) from None
    _check_budget(text, separators)
    try:
        return hl7.parse(text)
    except Exception:  # noqa: BLE001 (see above)
        raise _Refused("AR", _UNPARSEABLE) from None


def _check_budget(text: str, separators: str) -> None:
    """Refuse, before python-hl7 sees it, a message with more segments or delimiters than it may parse."""
    segments = text.count("\r") + 1
    if segments > MAX_SEGMENTS:
        raise _Refused("AR", f"message has {segments:,} segments, more than {MAX_SEGMENTS:,}; send it as several")
    # python-hl7 splits on the segment, field, repetition, component and subcomponent separators.
    delimiters = sum(text.count(c) for c in set(separators[1:]))
    if delimiters > MAX_DELIMITERS:
        raise _Refused(
            "AR", f"message has {delimiters:,} field delimiters, more than {MAX_DELIMITERS:,}; send it as several"
        )


def _field(segment: Any, number: int, repetition: int = 1, component: int = 1) -> str:
    """One field, repetition and component as unescaped text ('' when absent); `_BadField` when unreadable."""
    raw = _raw(segment, number, repetition, component)
    if not raw:
        return ""
    return _unescape(raw, segment.esc, segment.separators, f"{str(segment[0]).strip()}-{number}").strip()


def _raw(segment: Any, number: int, repetition: int, component: int) -> str:
    """A component's wire text (its first subcomponent), found as python-hl7's extract_field finds it."""
    if segment is None or number >= len(segment):
        return ""
    try:
        value = segment(number)(repetition)
        if isinstance(value, hl7.Repetition):
            value = value(component) if component <= len(value) else ""
        elif component > 1:
            return ""
        if isinstance(value, hl7.Component):
            value = value(1) if len(value) else ""
    except IndexError:
        return ""
    return str(value)


# HL7 v2 section 2.7 (2.10 in older versions): the sequences python-hl7 knows,
# expanded as it expands them. Formatting commands may take a count (\.sp3\).
_FORMATTING = {".br": "\r", ".sp": "\r", ".ce": "\r", ".fi": "", ".nf": "", ".in": "    ", ".ti": "    ", ".sk": " "}
_COUNT = re.compile(r"[+-]?\d{1,6}", re.ASCII)
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+", re.ASCII)


def _unescape(text: str, escape: str, separators: str, name: str) -> str:
    """A field's text with its escape sequences replaced, never growing by more than MAX_ESCAPE_GROWTH.

    What python-hl7 would drop (an unknown, empty, unclosed or character-set
    sequence, bad hex) is refused rather than dropped: `2\\Z\\0` is not 20.
    """
    if not escape or escape not in text:
        return text
    parts = text.split(escape)
    if len(parts) % 2 == 0:
        raise _BadField(name, "an escape sequence is not closed")
    named = {"F": separators[1], "R": separators[2], "S": separators[3], "T": separators[4], "E": escape}
    named |= {"H": "_", "N": "_"}  # highlighting: python-hl7's stand-in
    out, growth = [parts[0]], 0
    for sequence, literal in zip(parts[1::2], parts[2::2], strict=True):
        value = _expand(sequence, named, name)
        growth += len(value) - len(sequence) - 2
        if growth > MAX_ESCAPE_GROWTH:
            raise _BadField(name, f"escape sequences make it more than {MAX_ESCAPE_GROWTH:,} characters longer")
        out += (value, literal)
    return "".join(out)


def _expand(sequence: str, named: dict[str, str], name: str) -> str:
    if sequence in named:
        return named[sequence]
    if sequence in _FORMATTING:
        return _FORMATTING[sequence]
    if sequence[:3] in _FORMATTING and _COUNT.fullmatch(sequence[3:]):
        count = int(sequence[3:])
        if count > MAX_ESCAPE_GROWTH:
            raise _BadField(name, f"a formatting escape sequence repeats more than {MAX_ESCAPE_GROWTH:,} times")
        return _FORMATTING[sequence[:3]] * count
    if sequence[:1] == "X" and _HEX.fullmatch(sequence[1:]):
        return "".join(map(chr, bytes.fromhex(sequence[1:])))
    # Not quoted: in PID-3 the sequence may be part of a record number.
    kind = "an empty escape sequence" if not sequence else "an escape sequence HL7 does not define"
    raise _BadField(name, f"{kind} (or one with a bad count, bad hex or another character set)")


def read_header(text: str) -> MessageHeader:
    """MSH fields read without the parser, so that even an unparseable (or oversize) message's ACK echoes MSH-10.

    Only the start of the text is read: an MSH segment that does not end
    within HEADER_SCAN characters gives an empty header.
    """
    lines = _normalise(text[:HEADER_SCAN]).split("\r", 1)
    first = lines[0]
    if not first.startswith("MSH") or len(first) < 4 or (len(lines) == 1 and len(text) > HEADER_SCAN):
        return MessageHeader()
    fields = first.split(first[3])
    component = first[4] if len(fields) > 1 and fields[1] else "^"

    def get(n: int, component_no: int) -> str:
        # Only first components, so the trigger (MSH-9.2) keeps its default.
        # MSH-1 is the separator itself, so MSH-n is fields[n - 1].
        if component_no != 1 or len(fields) <= n - 1:
            return ""
        return fields[n - 1].split(component)[0].strip()[:MAX_CONTROL_ID]

    return _header_from(get)


def _header(message: hl7.Message) -> MessageHeader:
    msh = message.segment("MSH")
    return _header_from(lambda n, component: _field(msh, n, component=component)[:MAX_CONTROL_ID])


def _header_from(get: Callable[[int, int], str]) -> MessageHeader:
    """The ACK's echo of MSH, from `get(field, component)`; defaults where a field is empty."""
    return MessageHeader(
        control_id=get(10, 1),
        sending_application=get(3, 1),
        sending_facility=get(4, 1),
        receiving_application=get(5, 1),
        receiving_facility=get(6, 1),
        processing_id=get(11, 1) or "P",
        version=get(12, 1) or "2.5.1",
        trigger=get(9, 2) or "R01",
    )


def _check_header(message: hl7.Message, header: MessageHeader) -> None:
    msh = message.segment("MSH")
    kind = (_field(msh, 9, component=1), _field(msh, 9, component=2))
    if kind != ("ORU", "R01"):
        raise _Refused("AR", f"message type {'^'.join(kind)!r} is not ORU^R01; this interface takes lab results only")
    if not _field(msh, 10):
        raise _Refused("AR", "MSH-10 (message control ID) is empty")
    if len(_field(msh, 10)) > MAX_CONTROL_ID:
        raise _Refused("AR", f"MSH-10 is longer than {MAX_CONTROL_ID} characters")
    if not _field(msh, 12).startswith("2."):
        raise _Refused("AR", f"MSH-12 version {_field(msh, 12)!r} is not HL7 v2.x")


def _segments(message: hl7.Message) -> Iterator[tuple[str, Any]]:
    for segment in message:
        yield str(segment[0]).strip(), segment


def _lab_events(message: hl7.Message, header: MessageHeader, mapping: AdapterMapping) -> tuple[list[Lab], int]:
    sender_offset = _offset(_field(message.segment("MSH"), 7), "MSH-7")
    subject: str | None = None
    seen_pid = False
    obr: Any = None
    obr_id = "0"
    obr_number = obx_number = ignored = 0
    events: dict[str, Lab] = {}
    for name, segment in _segments(message):
        if name == "PID":
            seen_pid, subject, obr, obr_id = True, _subject(segment, mapping), None, str(obr_number)
        elif name == "OBR":
            obr, obr_number, obx_number = segment, obr_number + 1, 0
            obr_id = _set_id(segment, obr_number)
        elif name == "OBX":
            obx_number += 1
            obx_id = _set_id(segment, obx_number)
            where = f"OBX {obx_id}"
            if subject is None:
                raise _Refused("AR", f"{where} comes before any PID segment")
            event_id = f"hl7:{header.control_id}:{obr_id}:{obx_id}"
            try:
                lab = _lab(segment, obr, header, mapping, subject, sender_offset, where, event_id)
            except _BadField as bad:
                raise _Refused("AE", f"{where}: {bad}") from None
            if lab is None:
                ignored += 1
            elif event_id in events:
                raise _Refused("AE", f"{where}: OBX-1 set ID repeats within its OBR group")
            else:
                events[event_id] = lab
    if not seen_pid:
        raise _Refused("AR", "the message has no PID segment")
    if not events and not ignored:
        raise _Refused("AE", "the message carries no OBX result")
    return list(events.values()), ignored


_SET_ID = re.compile(r"\d{1,4}", re.ASCII)


def _set_id(segment: Any, position: int) -> str:
    """OBR-1 or OBX-1 (HL7 SI: up to 4 digits), else the segment's position; part of event ids."""
    text = _field(segment, 1)
    if not text:
        return str(position)
    if not _SET_ID.fullmatch(text):
        raise _BadField(f"{str(segment[0]).strip()}-1", "set ID is not a number of up to 4 digits")
    return text


def _subject(pid: Any, mapping: AdapterMapping) -> str:
    identifiers = []
    for repetition in range(1, 21):
        value = _field(pid, 3, repetition)
        if not value and repetition > 1:
            break
        if value:
            identifiers.append(value)
    try:
        subject = mapping.subject_for(identifiers)
    except AmbiguousSubject:
        raise _Refused("AE", "PID-3 identifiers map to more than one trial subject; fix the mapping file") from None
    if subject is None:
        # The identifier itself must not be echoed: the ACK goes back over the
        # wire and into interface-engine logs that the trial team reads.
        raise _Refused("AE", "patient not enrolled: no PID-3 identifier is in the mapping file")
    return subject


def _lab(
    obx: Any,
    obr: Any,
    header: MessageHeader,
    mapping: AdapterMapping,
    subject: str,
    sender_offset: timezone | None,
    where: str,
    event_id: str,
) -> Lab | None:
    code, system = _field(obx, 3, component=1), _field(obx, 3, component=3)
    alt_code, alt_system = _field(obx, 3, component=4), _field(obx, 3, component=6)
    analyte = mapping.analyte_for(code, system == "LN") or (
        mapping.analyte_for(alt_code, alt_system == "LN") if alt_code else None
    )
    if analyte is None:
        if mapping.ignores(code) or (alt_code and mapping.ignores(alt_code)):
            return None
        raise _Refused(
            "AE",
            f"{where}: unknown observation code {code!r} (coding system {system!r}); "
            "expected a LOINC code of a monitored analyte, or a code in the mapping file's "
            "local_codes or ignore_codes",
        )
    loinc = code if system == "LN" else (alt_code if alt_system == "LN" else None)

    status_code = _field(obx, 11)
    status = STATUS_BY_OBX11.get(status_code)
    if status is None:
        raise _Refused("AE", f"{where}: OBX-11 result status {status_code!r} is not one of P, F, C, X")

    value_type = _field(obx, 2)
    if value_type and value_type not in _NUMERIC_TYPES:
        raise _Refused("AE", f"{where}: OBX-2 value type {value_type!r} is not numeric (NM or SN)")
    raw_value = _field(obx, 5, component=2) if value_type == "SN" else _field(obx, 5)
    comparator = _field(obx, 5, component=1) if value_type == "SN" else ""
    if comparator not in ("", "="):
        raise _Refused("AE", f"{where}: OBX-5 has comparator {comparator!r}; only an exact value can be graded")
    if not raw_value and status == "cancelled":
        raise _Refused(
            "AE",
            f"{where}: a cancelled result (OBX-11 X) must repeat its value in OBX-5; contract v1 requires a value",
        )
    if not _NUMBER.match(raw_value):
        raise _Refused("AE", f"{where}: OBX-5 value {raw_value!r} is not a number")

    raw_unit = _field(obx, 6, component=1) or _field(obx, 6, component=2)
    if not raw_unit:
        raise _Refused("AE", f"{where}: OBX-6 units are empty")
    unit = ucum(raw_unit)

    ref_low, ref_high = _reference_range(_field(obx, 7), where)
    occurred_at = _observed_at(obx, obr, sender_offset, where)

    order = (_field(obr, 3) or _field(obr, 2)) if obr is not None else ""
    if not order and status in ("corrected", "cancelled"):
        raise _Refused(
            "AE",
            f"{where}: a corrected or cancelled result needs OBR-3 (or OBR-2) to name the result it replaces",
        )

    value: dict[str, Any] = {
        "event_id": event_id,
        "subject_id": subject,
        "site_id": mapping.site_id,
        "occurred_at": occurred_at.isoformat(),
        "source": mapping.source or ("hl7v2:" + header.sending_application if header.sending_application else "hl7v2"),
        "analyte": analyte,
        "value": float(raw_value),
        "unit": unit,
        "status": status,
    }
    if loinc:
        value["loinc"] = loinc
    if ref_low is not None:
        value["ref_low"] = ref_low
    if ref_high is not None:
        value["ref_high"] = ref_high
    if order:
        value["result_id"] = _result_id(header, order, code, system, _field(obx, 4))
    event = decode(LABS, json.dumps(value).encode())
    if isinstance(event, Rejection):
        hint = ""
        if event.reason == "unit_mismatch" and _field(obx, 6, component=2) and not _field(obx, 6, component=3):
            hint = " (a '^' inside a unit must be escaped as \\S\\, e.g. 10\\S\\9/L)"
        raise _Refused("AE", f"{where}: {event.reason}: {event.detail}{hint}")
    assert isinstance(event, Lab)
    return event


def _result_id(header: MessageHeader, order: str, code: str, system: str, sub_id: str) -> str:
    # Stable across the P -> F -> C/X versions of one result (they share the
    # order number and observation code, not MSH-10). Hashed, because an order
    # (accession) number can be looked up to a patient in the hospital's LIS.
    material = "\x1f".join((header.sending_facility, order, system, code, sub_id))
    return "hl7r:" + hashlib.sha256(material.encode()).hexdigest()[:32]


def _reference_range(text: str, where: str) -> tuple[float | None, float | None]:
    if not text:
        return None, None
    if m := _RANGE.match(text):
        return float(m["low"]), float(m["high"])
    if m := _UPPER.match(text):
        return None, float(m["high"])
    if m := _LOWER.match(text):
        return float(m["low"]), None
    raise _Refused("AE", f"{where}: OBX-7 reference range {text!r} is not 'low-high', '<high' or '>low'")


def _offset(text: str, name: str) -> timezone | None:
    m = _DTM.match(text)
    if m is None or m["tz"] is None:
        return None
    sign = -1 if m["tz"][0] == "-" else 1
    hours, minutes = int(m["tz"][1:3]), int(m["tz"][3:5])
    # Offsets in use run from -12:00 to +14:00; timezone() raises from 24:00.
    if minutes > 59 or hours * 60 + minutes > 14 * 60:
        raise _BadField(name, f"UTC offset {m['tz']} is outside -1200 to +1400 ({text!r})")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _observed_at(obx: Any, obr: Any, sender_offset: timezone | None, where: str) -> datetime:
    text, name = _field(obx, 14), "OBX-14"
    if not text and obr is not None:
        text, name = _field(obr, 7), "OBR-7"
    if not text:
        raise _Refused("AE", f"{where}: no observation time (OBX-14 or OBR-7)")
    m = _DTM.match(text)
    if m is None or m["mi"] is None:
        raise _Refused(
            "AE", f"{where}: {name} {text!r} is not an HL7 date-time to the minute (YYYYMMDDHHMM[SS][+ZZZZ])"
        )
    # HL7 v2: a time without an offset is in the sender's time zone, which
    # MSH-7 states when it has an offset. Without either, the time is ambiguous.
    tz = _offset(text, name) or sender_offset
    if tz is None:
        raise _Refused("AE", f"{where}: {name} {text!r} has no UTC offset and MSH-7 gives none either")
    try:
        micro = int(float(m["frac"]) * 1_000_000) if m["frac"] else 0
        return datetime(
            int(m["y"]), int(m["mo"]), int(m["d"]), int(m["h"]), int(m["mi"]), int(m["s"] or 0), micro, tzinfo=tz
        )
    except ValueError:
        raise _Refused("AE", f"{where}: {name} {text!r} is not a valid date-time") from None


_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"))


# Other control characters, 0x0B and 0x1C (MLLP's start and end blocks) among them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _escape(text: str) -> str:
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    text = text.replace("\r", " ").replace("\n", " ")
    return _CONTROL.sub(lambda m: f"\\X{ord(m[0]):02X}\\", text)


def ack_text(outcome: OruOutcome) -> str:
    """MSA-3: what happened to the message, in words the sender's operators can act on."""
    if outcome.ack_code == "AA":
        return f"accepted: {len(outcome.events)} result(s) published, {outcome.ignored} not monitored"
    return outcome.reason


def ack_message(outcome: OruOutcome, now: datetime, application: str = "TRIALWATCH") -> str:
    """The original-mode ACK for a message: MSA-1 the code, MSA-2 its MSH-10, MSA-3 the reason."""
    h = outcome.header
    stamp = now.strftime("%Y%m%d%H%M%S%z")
    control = f"ACK{h.control_id}" if h.control_id else f"ACK{now.strftime('%Y%m%d%H%M%S%f')}"
    text = ack_text(outcome)
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            application,
            _escape(h.receiving_facility),
            _escape(h.sending_application),
            _escape(h.sending_facility),
            stamp,
            "",
            f"ACK^{_escape(h.trigger)}^ACK",
            _escape(control[: MAX_CONTROL_ID + 3]),
            _escape(h.processing_id),
            _escape(h.version),
        ]
    )
    msa = "|".join(["MSA", outcome.ack_code, _escape(h.control_id), _escape(text)])
    return msh + "\r" + msa + "\r"


__all__ = [
    "INTERNAL_ERROR",
    "MLLP_END",
    "MLLP_START",
    "AckCode",
    "MessageHeader",
    "OruOutcome",
    "ack_message",
    "ack_text",
    "map_oru",
    "read_header",
    "split_messages",
]
