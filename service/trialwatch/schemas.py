"""Generate `schemas/`: a JSON Schema per message type and one AsyncAPI 3.0 document, from the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trialwatch import __version__
from trialwatch.contract import (
    ADVERSE_EVENTS,
    ALERT_ACKS,
    ALERTS,
    ALERTS_MASKED,
    DEADLETTER,
    ENROLLMENT,
    LABS,
    SCANS,
    TREATMENT,
    AdverseEvent,
    AlertAck,
    AlertMessage,
    DeadLetter,
    Enrollment,
    Lab,
    MaskedAlertMessage,
    Scan,
    Treatment,
)
from trialwatch.units import CANONICAL_UNIT, PLAUSIBLE, TO_CANONICAL, UNIT_ALIASES

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

# topic -> (message name, model, key description, what it carries)
TOPICS: dict[str, tuple[str, type[BaseModel], str, str]] = {
    ENROLLMENT: ("Enrollment", Enrollment, "subject_id", "A subject is enrolled and randomised."),
    TREATMENT: ("Treatment", Treatment, "subject_id", "Second-line start, SBRT fractions, systemic holds, withdrawal."),
    LABS: ("Lab", Lab, "subject_id", "One lab result per message."),
    SCANS: ("Scan", Scan, "subject_id", "One imaging assessment (lesion measurements) per message."),
    ADVERSE_EVENTS: ("AdverseEvent", AdverseEvent, "subject_id", "One adverse event report, or an update of one."),
    ALERTS: ("Alert", AlertMessage, "alert_id", "DSMB alert stream, unblinded (carries arm). Compacted."),
    ALERTS_MASKED: (
        "MaskedAlert",
        MaskedAlertMessage,
        "alert_id",
        "Alerts for blinded roles: no arm, no arm-revealing rule. Compacted.",
    ),
    DEADLETTER: ("DeadLetter", DeadLetter, "the rejected record's key", "Every input message that was not accepted."),
    ALERT_ACKS: (
        "AlertAck",
        AlertAck,
        "alert_id",
        "A DSMB member acknowledged one alert state (written by POST /alerts/{alert_id}/ack). The audit trail: "
        "never deleted. Not part of the fixed v1 event contract; added with DSMB delivery.",
    ),
}
_INPUT = {ENROLLMENT, TREATMENT, LABS, SCANS, ADVERSE_EVENTS}


def _schema_file(name: str) -> str:
    return f"{name}.schema.json"


def json_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for topic, (name, model, _, doc) in TOPICS.items():
        schema = model.model_json_schema(mode="validation" if topic in _INPUT else "serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://trialwatch.invalid/schemas/v1/{_schema_file(name)}"
        schema["description"] = f"{doc} Topic: {topic}."
        out[_schema_file(name)] = schema
    return out


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic, (name, _model, key, doc) in TOPICS.items():
        channel_id = topic.replace(".", "_").replace("-", "_")
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": {"$ref": f"./{_schema_file(name)}"},
            "bindings": {
                "kafka": {"key": {"type": "string", "description": f"UTF-8 {key}"}, "bindingVersion": "0.5.0"}
            },
        }
        channels[channel_id] = {
            "address": topic,
            "description": doc,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"kafka": {"topic": topic, "bindingVersion": "0.5.0"}},
        }
        inbound = topic in _INPUT
        operations[f"{'publish' if inbound else 'consume'}{name}"] = {
            # From the service's point of view: it receives input, sends the rest.
            "action": "receive" if inbound else "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "trialwatch event contract",
            "version": f"v1 (service {__version__})",
            "description": (
                "Safety monitoring of trial NCT06592612. Input topics are keyed by subject_id and share "
                "one partition count. Accepted unit spellings per analyte: see units.json."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:9092", "protocol": "kafka"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def units_table() -> dict[str, Any]:
    return {
        "accepted_units": {analyte: sorted(units) for analyte, units in TO_CANONICAL.items()},
        "aliases": dict(sorted(UNIT_ALIASES.items())),
        "plausible": {
            analyte: {
                "unit": CANONICAL_UNIT[analyte],
                "value_max": float(bounds.value_max),
                "ref_high_min": float(bounds.uln_min),
                "ref_high_max": float(bounds.uln_max),
                "ref_low_max": float(bounds.uln_max),
            }
            for analyte, bounds in PLAUSIBLE.items()
        },
        "plausible_note": (
            "Bounds in the analyte's canonical unit; a value in another unit is converted first. "
            "A value above value_max is dead-lettered with reason implausible_value. A reference range "
            "outside ref_high_min..ref_high_max (or ref_low above ref_low_max) is set aside: the result is "
            "graded on the protocol's default range and the alert's evidence says so "
            "(uln_origin protocol_default_implausible_site_range)."
        ),
    }


def rendered() -> dict[str, str]:
    files = json_schemas()
    files["asyncapi.json"] = asyncapi()
    files["units.json"] = units_table()
    return {name: json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n" for name, doc in files.items()}


def write_schemas(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (directory / name).write_text(text, encoding="utf-8")
    return sorted(rendered())


def check_schemas(directory: Path) -> list[str]:
    """Names of generated files that are missing or differ from what the models produce."""
    drift = []
    for name, text in rendered().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            drift.append(name)
    return drift
