"""Event files, one `{"topic": ..., "value": {...}}` per line: read and validated as the worker would.

Shared by `trialwatch publish` (and the `Publisher` API) and `trialwatch
replay`; it loads no rule engine, so a hospital integrator importing the
publisher does not either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from trialwatch.contract import MAX_INPUT_BYTES, MODEL_BY_TOPIC, InputEvent
from trialwatch.decode import DuplicateKey, Rejection, decode, loads_unique

# A line is the envelope around one input value: the value's limit plus room for the envelope.
MAX_LINE_CHARS = MAX_INPUT_BYTES + 1024


@dataclass(frozen=True, slots=True)
class BadLine:
    line_no: int
    reason: str
    detail: str


def read_event_file(lines: Iterable[str]) -> Iterator[tuple[int, InputEvent | BadLine]]:
    """Each line `{"topic": ..., "value": {...}}` as a validated event, or why it is not one."""
    for line_no, line in enumerate(lines, start=1):
        item = read_line(line_no, line)
        if item is not None:
            yield line_no, item


def read_line(line_no: int, line: str) -> InputEvent | BadLine | None:
    """One line of an event file as a validated event, or why it is not one; None for a blank line."""
    if not line.strip():
        return None
    if len(line) > MAX_LINE_CHARS:
        return BadLine(line_no, "too_large", f"line has {len(line):,} characters; at most {MAX_LINE_CHARS:,}")
    try:
        # A key repeated in the value is refused live (decode), so here too,
        # in the one parse of the line, before a dict would merge it.
        envelope = loads_unique(line)
    except DuplicateKey as exc:
        return BadLine(line_no, "duplicate_key", f"the key {exc.key[:64]!r} appears twice in one object")
    except ValueError as exc:
        return BadLine(line_no, "not_json", f"line is not JSON: {exc}")
    except RecursionError:
        return BadLine(line_no, "not_json", "line is not JSON this reader accepts: nested too deeply")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("topic"), str) or "value" not in envelope:
        return BadLine(line_no, "not_an_object", 'a line must be {"topic": "...", "value": {...}}')
    # Its keys were checked for repeats in the parse above.
    result = decode(envelope["topic"], _value_bytes(line, envelope), keys_checked=True)
    return BadLine(line_no, result.reason, result.detail) if isinstance(result, Rejection) else result


def _value_bytes(line: str, envelope: dict[str, object]) -> bytes:
    """The value's JSON as a publisher would have sent it, for `decode` to judge as the worker does.

    A line as `trialwatch seed`, `json.dumps` and most tools write it
    (`{"topic": "<topic>", "value": <value>}`) carries the value's own text:
    it is taken as is (the worker, too, validates the publisher's bytes, and
    encoding the parsed value again cost a sixth of the replay). Any other
    layout has its value written again (not ASCII-escaped: the size the
    live decoder judges is the publisher's UTF-8).
    """
    topic = envelope["topic"]
    if len(envelope) == 2 and isinstance(topic, str) and topic in MODEL_BY_TOPIC:
        prefix = f'{{"topic": "{topic}", "value": '
        text = line.rstrip()
        if text.startswith(prefix) and text.endswith("}"):
            return text[len(prefix) : -1].encode()
    return json.dumps(envelope["value"], ensure_ascii=False).encode()
