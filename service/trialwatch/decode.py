"""Turn one raw input record into a validated event or a rejection a publisher can act on."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from trialwatch.contract import MODEL_BY_TOPIC, InputEvent, RejectReason


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
}


def _reason_for(error_type: str, message: str) -> RejectReason:
    if error_type in _REASON_BY_ERROR_TYPE:
        return _REASON_BY_ERROR_TYPE[error_type]
    if error_type.endswith("_type") or error_type.endswith("_parsing"):
        return "wrong_type"
    if error_type == "value_error" and "does not fit analyte" in message:
        return "unit_mismatch"
    return "invalid_value"


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def decode(topic: str, payload: bytes) -> InputEvent | Rejection:
    """Validate one record's value against the topic's v1 model.

    Never raises for bad input: anything that is not a valid event comes back
    as a `Rejection`, so the caller dead-letters it and moves on.
    """
    model = MODEL_BY_TOPIC.get(topic)
    if model is None:
        return Rejection("unknown_topic", f"topic {topic!r} is not an input topic of contract v1", [])
    try:
        # One parse on the hot path: pydantic's JSON mode parses and validates
        # together, and strict JSON mode accepts RFC 3339 strings for
        # date-times while still refusing "12" for a number.
        event: InputEvent = model.model_validate_json(payload)  # type: ignore[assignment]
    except ValidationError as exc:
        return _rejection(exc, payload)
    return event


def _rejection(exc: ValidationError, payload: bytes) -> Rejection:
    details = exc.errors(include_url=False, include_input=False)
    errors: list[dict[str, Any]] = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in details]
    first = details[0]
    if first["type"] == "json_invalid":
        return Rejection("not_json", f"value is not JSON: {first['msg']}", [])
    if first["type"] == "model_type" and not first["loc"]:
        kind = type(json.loads(payload)).__name__
        return Rejection("not_an_object", f"value is a JSON {kind}, not an object", [])
    raw = json.loads(payload)
    event_id = raw.get("event_id")
    return Rejection(
        _reason_for(first["type"], first["msg"]),
        _describe(errors),
        errors,
        event_id if isinstance(event_id, str) else None,
    )


def printable(data: bytes | None) -> str | None:
    """Bytes as UTF-8 text, or `base64:`-prefixed when they are not UTF-8."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode("ascii")
