"""The checked-in `schemas/` documents: generated from the models and honouring the v1 contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from trialwatch.schemas import SCHEMA_DIR, check_schemas, rendered

# Input topics of the contract, all keyed by subject_id.
INPUT_TOPICS = [
    "trial.enrollment.v1",
    "trial.treatment.v1",
    "trial.labs.v1",
    "trial.scans.v1",
    "trial.adverse-events.v1",
]

# Alert fields of the contract (`trial.alerts.v1`).
ALERT_FIELDS = {
    "alert_id",
    "revision",
    "status",
    "rule",
    "severity",
    "subject_id",
    "site_id",
    "arm",
    "occurred_at",
    "raised_at",
    "ctcae_grade",
    "report_due_at",
    "evidence",
    "summary",
}


def load(name: str) -> dict[str, Any]:
    """A checked-in schema file."""
    data: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return data


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    """Follow a local `#/a/b` reference inside `document`."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def channel_for(document: dict[str, Any], address: str) -> dict[str, Any]:
    channels = [c for c in document["channels"].values() if c.get("address") == address]
    assert len(channels) == 1, f"{len(channels)} channels with address {address!r}"
    channel: dict[str, Any] = channels[0]
    return channel


class TestCheckedInSchemasMatchModels:
    """The files in schemas/ are exactly what the models generate (no drift)."""

    def test_no_drift(self) -> None:
        expected: list[str] = []
        assert expected == check_schemas(SCHEMA_DIR)

    def test_every_rendered_file_is_checked_in(self) -> None:
        expected: list[str] = []
        assert expected == sorted(name for name in rendered() if not (SCHEMA_DIR / name).is_file())


class TestCheckSchemasDetectsDrift:
    """check_schemas names exactly the file that no longer matches the models."""

    @pytest.fixture
    def schema_copy(self, tmp_path: Path) -> Path:
        copy = tmp_path / "schemas"
        shutil.copytree(SCHEMA_DIR, copy)
        return copy

    def test_clean_copy_has_no_drift(self, schema_copy: Path) -> None:
        expected: list[str] = []
        assert expected == check_schemas(schema_copy)

    @pytest.mark.parametrize("name", ["Lab.schema.json", "Alert.schema.json", "asyncapi.json", "units.json"])
    def test_edited_property(self, schema_copy: Path, name: str) -> None:
        path = schema_copy / name
        document = json.loads(path.read_text(encoding="utf-8"))
        document["x-edited-by-hand"] = True
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        assert [name] == check_schemas(schema_copy)

    def test_removed_field(self, schema_copy: Path) -> None:
        path = schema_copy / "Lab.schema.json"
        document = json.loads(path.read_text(encoding="utf-8"))
        del document["properties"]["unit"]
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        expected = ["Lab.schema.json"]
        assert expected == check_schemas(schema_copy)

    def test_whitespace_change(self, schema_copy: Path) -> None:
        path = schema_copy / "Enrollment.schema.json"
        path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
        expected = ["Enrollment.schema.json"]
        assert expected == check_schemas(schema_copy)

    def test_missing_file(self, schema_copy: Path) -> None:
        (schema_copy / "MaskedAlert.schema.json").unlink()
        expected = ["MaskedAlert.schema.json"]
        assert expected == check_schemas(schema_copy)


class TestAsyncApiDocument:
    """schemas/asyncapi.json is an AsyncAPI 3.0.0 document with a channel per input topic, keyed by subject_id."""

    def test_version(self) -> None:
        expected = "3.0.0"
        assert expected == load("asyncapi.json")["asyncapi"]

    @pytest.mark.parametrize("topic", INPUT_TOPICS)
    def test_channel_address(self, topic: str) -> None:
        assert topic == channel_for(load("asyncapi.json"), topic)["address"]

    @pytest.mark.parametrize("topic", INPUT_TOPICS)
    def test_kafka_key_binding(self, topic: str) -> None:
        document = load("asyncapi.json")
        channel = channel_for(document, topic)
        refs = [m["$ref"] for m in channel["messages"].values()]
        assert refs, f"channel {topic!r} has no message"
        for ref in refs:
            key = resolve(document, ref)["bindings"]["kafka"]["key"]
            expected = ("string", True)
            assert expected == (key.get("type"), "subject_id" in key.get("description", ""))


class TestAlertSchemas:
    """The alert schemas carry the contract's alert fields; the masked one never has `arm`."""

    def test_alert_has_contract_fields(self) -> None:
        expected: set[str] = set()
        assert expected == ALERT_FIELDS - set(load("Alert.schema.json")["properties"])

    def test_masked_alert_has_no_arm(self) -> None:
        assert "arm" not in load("MaskedAlert.schema.json")["properties"]

    def test_masked_alert_has_the_other_contract_fields(self) -> None:
        expected: set[str] = set()
        assert expected == (ALERT_FIELDS - {"arm"}) - set(load("MaskedAlert.schema.json")["properties"])
