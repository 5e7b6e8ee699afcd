"""Turn one raw input record into a validated event or a rejection a publisher can act on."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from trialwatch.contract import MAX_INPUT_BYTES, MODEL_BY_TOPIC, PLAUSIBILITY_BOUNDED, InputEvent, RejectReason


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str
    errors: list[dict[str, Any]]
    event_id: str | None = None


# pydantic error types mapped to the reason a publisher sees (and the metric
# label). The first error of a message decides its reason.
_REASON_BY_ERROR_TYPE: dict[str, RejectReason] = {
    "missing": "missing_field",
    "missing_field": "missing_field",
    "timezone_aware": "naive_datetime",
    "literal_error": "unknown_enum_value",
    "enum": "unknown_enum_value",
    "implausible_value": "implausible_value",
}

# Field-level errors kept in a dead letter: the first ones say what to fix.
MAX_ERRORS = 20
_MAX_TEXT = 300


def _reason_for(error_type: str, message: str, loc: tuple[int | str, ...]) -> RejectReason:
    if error_type in ("less_than_equal", "less_than") and loc and loc[-1] in PLAUSIBILITY_BOUNDED:
        return "implausible_value"
    if error_type in _REASON_BY_ERROR_TYPE:
        return _REASON_BY_ERROR_TYPE[error_type]
    if error_type.endswith("_type") or error_type.endswith("_parsing"):
        return "wrong_type"
    if error_type == "value_error" and "does not fit analyte" in message:
        return "unit_mismatch"
    return "invalid_value"


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(errors: list[dict[str, Any]], total: int) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    more = f"; and {total - len(errors)} more errors" if total > len(errors) else ""
    return "; ".join(parts) + more


class DuplicateKey(ValueError):
    """An object of a JSON document repeats `key`."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKey(dup)
    return out


def loads_unique(document: bytes | str) -> Any:
    """`json.loads`, refusing a repeated key with `DuplicateKey`.

    JSON parsers disagree on a repeated key (pydantic keeps the last, others
    the first), so a publisher and the service could read different values.
    """
    return json.loads(document, object_pairs_hook=_no_duplicate_keys)


def duplicate_key(payload: bytes | str) -> str | None:
    """The first key an object of the document repeats, or None (for documents pydantic already parsed)."""
    try:
        loads_unique(payload)
    except DuplicateKey as exc:
        return exc.key
    return None


def decode(topic: str, payload: bytes, *, keys_checked: bool = False) -> InputEvent | Rejection:
    """Validate one record's value against the topic's v1 model.

    Never raises for bad input: anything that is not a valid event comes back
    as a `Rejection`, so the caller dead-letters it and moves on.
    `keys_checked`: the caller parsed `payload` with `loads_unique` already
    (replay, which reads it inside a line), so repeated keys are not looked for again.
    """
    model = MODEL_BY_TOPIC.get(topic)
    if model is None:
        return Rejection("unknown_topic", f"topic {_clip(topic, 100)!r} is not an input topic of contract v1", [])
    if len(payload) > MAX_INPUT_BYTES:
        return Rejection(
            "too_large", f"value is {len(payload):,} bytes; an input message may have at most {MAX_INPUT_BYTES:,}", []
        )
    try:
        # One parse on the hot path: pydantic's JSON mode parses and validates
        # together, and strict JSON mode accepts RFC 3339 strings for
        # date-times while still refusing "12" for a number.
        event: InputEvent = model.model_validate_json(payload)  # type: ignore[assignment]
    except ValidationError as exc:
        return _rejection(exc, payload)
    repeated = None if keys_checked else duplicate_key(payload)
    if repeated is not None:
        return Rejection(
            "duplicate_key", f"the key {_clip(repeated, 64)!r} appears twice in one object", [], event.event_id
        )
    return event


def _rejection(exc: ValidationError, payload: bytes) -> Rejection:
    details = exc.errors(include_url=False, include_input=False)
    # Bounded: a document can carry thousands of bad fields, and a location
    # names the publisher's own keys, which can be of any length.
    errors: list[dict[str, Any]] = [
        {
            "loc": [p if isinstance(p, int) else _clip(str(p), 64) for p in e["loc"]],
            "msg": _clip(e["msg"]),
            "type": e["type"],
        }
        for e in details[:MAX_ERRORS]
    ]
    first = details[0]
    if first["type"] == "json_invalid":
        return Rejection("not_json", f"value is not JSON: {_clip(first['msg'])}", [])
    if first["type"] == "model_type" and not first["loc"]:
        return Rejection("not_an_object", "value is JSON but not an object", [])
    event_id = _event_id(payload)
    return Rejection(
        _reason_for(first["type"], first["msg"], first["loc"]), _describe(errors, len(details)), errors, event_id
    )


def _event_id(payload: bytes) -> str | None:
    """The rejected message's `event_id` when it has a sane one, so the publisher can find it."""
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return event_id if isinstance(event_id, str) and len(event_id) <= 256 else None


def excerpt(data: bytes | None, limit: int) -> tuple[str | None, bool]:
    """`printable` of at most the first `limit` bytes (cut on a character boundary), and whether it was cut."""
    if data is None or len(data) <= limit:
        return printable(data), False
    head = data[:limit]
    try:
        return head.decode("utf-8"), True
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end is not a reason for base64.
        if exc.start >= limit - 3 and exc.reason == "unexpected end of data":
            return head[: exc.start].decode("utf-8"), True
        return printable(head), True


def printable(data: bytes | None) -> str | None:
    """Bytes as UTF-8 text, or `base64:`-prefixed when they are not UTF-8."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode("ascii")
