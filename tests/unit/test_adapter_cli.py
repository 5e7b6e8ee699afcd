"""`trialwatch hl7` and `trialwatch fhir` on files: per-message report, exit code, `--dry-run` event file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_fhir_adapter import ADVERSE_EVENT, OBSERVATION
from tests.unit.test_hl7_adapter import PLATELETS, oru
from trialwatch.cli import main
from trialwatch.replay import BadLine, read_event_file

MAPPING_TOML = 'site_id = "SITE-GZ"\n[subjects]\nMRN0001 = "TW-101"\n'


@pytest.fixture
def mapping(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(MAPPING_TOML)
    return path


class TestHl7Command:
    """Good messages become an event file; bad ones are reported by number and make the exit code 1."""

    def test_reports_each_message_and_fails_when_any_is_refused(
        self, tmp_path: Path, mapping: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        messages = [
            oru(PLATELETS, control="M1"),
            oru(PLATELETS, control="M2", mrn="MRN0999"),
            oru(PLATELETS, control="M1"),
        ]
        path = tmp_path / "in.hl7"
        path.write_text("\n\n".join(m.replace("\r", "\n") for m in messages) + "\n")

        code = main(["hl7", str(path), "--mapping", str(mapping), "--dry-run"])

        out, err = capsys.readouterr()
        assert 1 == code
        events = [item for _, item in read_event_file(out.splitlines())]
        assert not any(isinstance(e, BadLine) for e in events), events
        # The third message re-sends M1: the same answer, not a second event.
        assert ["hl7:M1:1:1"] == [e.event_id for e in events if not isinstance(e, BadLine)]
        assert ["AA", "AE", "AA"] == [line.split(": ")[1].split(" ")[0] for line in err.splitlines()[:3]]
        assert "MRN0" not in out + err

    def test_file_or_listen_is_required(self, mapping: Path) -> None:
        assert 2 == main(["hl7", "--mapping", str(mapping)])

    def test_missing_mapping_is_a_usage_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert 2 == main(["hl7", "-", "--mapping", str(tmp_path / "absent.toml")])
        assert "cannot read mapping file" in capsys.readouterr().err


class TestFhirCommand:
    """Each resource is reported; the events it produced are an event file the service accepts."""

    def test_ndjson_with_a_bad_line(self, tmp_path: Path, mapping: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "in.ndjson"
        path.write_text("\n".join([json.dumps(OBSERVATION), json.dumps(ADVERSE_EVENT), "{oops"]) + "\n")

        code = main(["fhir", str(path), "--mapping", str(mapping), "--dry-run"])

        out, err = capsys.readouterr()
        assert 1 == code
        topics = [json.loads(line)["topic"] for line in out.splitlines()]
        assert ["trial.labs.v1", "trial.adverse-events.v1"] == topics
        assert "line 3: rejected: not JSON" in err
        assert "MRN0001" not in out + err
