"""HL7 v2 ORU^R01 to trial.labs.v1: the pure mapping and the ACK it answers with."""

from __future__ import annotations

import io
import json
import logging
import sys
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
import structlog

from trialwatch.adapters import EventFileSink
from trialwatch.adapters.hl7v2 import OruOutcome, ack_message, map_oru, split_messages
from trialwatch.adapters.mapping import AdapterMapping, MappingFileError, load_mapping
from trialwatch.adapters.mllp import Hl7Intake
from trialwatch.cli import main
from trialwatch.contract import Lab

# Synthetic: MRN0001 is a made-up hospital record number, TW-101 a made-up subject code.
MAPPING = AdapterMapping(
    site_id="SITE-GZ",
    subjects={"MRN0001": "TW-101", "MRN0002": "TW-102"},
    local_codes={"PLT": "platelets", "TBIL": "total_bilirubin"},
    ignore_codes=frozenset({"2951-2"}),
)

MSH = "MSH|^~\\&|LIS|GZH|TRIALWATCH|TW|20250305103000+0800||ORU^R01^ORU_R01|{control}|P|2.5.1"
PID = "PID|1||{mrn}^^^GZH^MR||SYNTHETIC^PATIENT"
OBR = "OBR|1|PLC100|FIL200|58410-2^CBC^LN|||20250305080000+0800"
PLATELETS = "OBX|1|NM|777-3^Platelets^LN||20|10*9/L|125-350|LL|||F|||20250305080000+0800"


def oru(*obx: str, control: str = "MSG0001", mrn: str = "MRN0001", obr: str = OBR, pid: str | None = None) -> str:
    return "\r".join([MSH.format(control=control), pid or PID.format(mrn=mrn), obr, *obx])


def only_lab(outcome: OruOutcome) -> Lab:
    assert "AA" == outcome.ack_code, outcome.reason
    assert 1 == len(outcome.events)
    return outcome.events[0]


class TestAcceptedResults:
    """A mapped result becomes a contract lab event with the fields the rules read."""

    def test_loinc_platelets_in_si_units(self) -> None:
        lab = only_lab(map_oru(oru(PLATELETS), MAPPING))
        assert ("TW-101", "SITE-GZ") == (lab.subject_id, lab.site_id)
        assert ("platelets", "777-3", 20.0, "10*9/L") == (lab.analyte, lab.loinc, lab.value, lab.unit)
        assert (125.0, 350.0) == (lab.ref_low, lab.ref_high)
        assert "final" == lab.status
        assert datetime(2025, 3, 5, 0, 0, tzinfo=UTC) == lab.occurred_at

    def test_conventional_units_are_kept_and_normalised_to_ucum(self) -> None:
        obx = "OBX|1|NM|1975-2^Bilirubin total^LN||3.2|mg/dl|0.1-1.2|H|||F|||20250305080000+0800"
        lab = only_lab(map_oru(oru(obx), MAPPING))
        assert ("total_bilirubin", 3.2, "mg/dL", 1.2) == (lab.analyte, lab.value, lab.unit, lab.ref_high)

    def test_escaped_caret_in_unit_is_read_as_the_alias(self) -> None:
        obx = "OBX|1|NM|777-3^Platelets^LN||20|10\\S\\9/L|||||F|||20250305080000+0800"
        assert "10*9/L" == only_lab(map_oru(oru(obx), MAPPING)).unit

    def test_local_code_maps_through_the_table_and_has_no_loinc(self) -> None:
        obx = "OBX|1|NM|PLT^Plt^L||42|10\\S\\3/uL|||||P|||20250305080000+0800"
        lab = only_lab(map_oru(oru(obx), MAPPING))
        assert ("platelets", None, "10*3/uL", "preliminary") == (lab.analyte, lab.loinc, lab.unit, lab.status)

    def test_upper_limit_only_range_sets_ref_high(self) -> None:
        obx = "OBX|1|NM|1742-6^ALT^LN||250|U/L|<40|H|||F|||20250305080000+0800"
        lab = only_lab(map_oru(oru(obx), MAPPING))
        assert (None, 40.0) == (lab.ref_low, lab.ref_high)

    def test_obr7_gives_the_time_when_obx14_is_empty(self) -> None:
        obx = "OBX|1|NM|777-3^Platelets^LN||20|10*9/L|||||F"
        assert "2025-03-05T08:00:00+08:00" == only_lab(map_oru(oru(obx), MAPPING)).occurred_at.isoformat()

    def test_time_without_offset_takes_the_senders_offset_from_msh7(self) -> None:
        obx = "OBX|1|NM|777-3^Platelets^LN||20|10*9/L|||||F|||202503050930"
        assert "2025-03-05T09:30:00+08:00" == only_lab(map_oru(oru(obx), MAPPING)).occurred_at.isoformat()

    def test_ignored_codes_are_counted_not_published(self) -> None:
        sodium = "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F|||20250305080000+0800"
        outcome = map_oru(oru(PLATELETS, sodium), MAPPING)
        assert ("AA", 1, 1) == (outcome.ack_code, len(outcome.events), outcome.ignored)

    def test_event_ids_come_from_msh10_and_set_ids(self) -> None:
        wbc = "OBX|2|NM|6690-2^WBC^LN||4.1|10*9/L|||||F|||20250305080000+0800"
        outcome = map_oru(oru(PLATELETS, wbc, control="CTRL-7"), MAPPING)
        assert ["hl7:CTRL-7:1:1", "hl7:CTRL-7:1:2"] == [e.event_id for e in outcome.events]


class TestResultVersions:
    """Preliminary, final, corrected and cancelled versions of one result share its result_id."""

    def test_corrected_and_cancelled_versions_share_the_result_id_of_the_final(self) -> None:
        final = only_lab(map_oru(oru(PLATELETS, control="M1"), MAPPING))
        corrected = only_lab(
            map_oru(oru(PLATELETS.replace("||20|", "||120|").replace("|F|", "|C|"), control="M2"), MAPPING)
        )
        cancelled = only_lab(map_oru(oru(PLATELETS.replace("|F|", "|X|"), control="M3"), MAPPING))
        assert ("corrected", 120.0) == (corrected.status, corrected.value)
        assert "cancelled" == cancelled.status
        assert final.result_id is not None
        assert final.result_id == corrected.result_id == cancelled.result_id
        assert len({final.event_id, corrected.event_id, cancelled.event_id}) == 3

    def test_another_order_is_another_result(self) -> None:
        first = only_lab(map_oru(oru(PLATELETS), MAPPING))
        other = only_lab(map_oru(oru(PLATELETS, obr=OBR.replace("FIL200", "FIL201")), MAPPING))
        assert first.result_id != other.result_id

    def test_result_id_does_not_carry_the_order_number(self) -> None:
        assert "FIL200" not in (only_lab(map_oru(oru(PLATELETS), MAPPING)).result_id or "")

    def test_cancelled_without_a_value_is_an_error_not_a_zero(self) -> None:
        outcome = map_oru(oru("OBX|1|NM|777-3^Platelets^LN|||10*9/L|||||X|||20250305080000+0800"), MAPPING)
        assert "AE" == outcome.ack_code
        assert "cancelled" in outcome.reason
        assert () == outcome.events

    def test_correction_without_an_order_number_is_an_error(self) -> None:
        outcome = map_oru(oru(PLATELETS.replace("|F|", "|C|"), obr="OBR|1|||58410-2^CBC^LN"), MAPPING)
        assert "AE" == outcome.ack_code
        assert "OBR-3" in outcome.reason


class TestErrors:
    """AE for what the sender's application must fix, AR for what is not an ORU^R01 at all."""

    @pytest.mark.parametrize(
        ("obx", "expected"),
        [
            ("OBX|1|NM|9999-9^Mystery^LN||5|U/L|||||F|||20250305080000+0800", "unknown observation code '9999-9'"),
            ("OBX|1|NM|777-3^Platelets^LN||abc|10*9/L|||||F|||20250305080000+0800", "not a number"),
            ("OBX|1|NM|777-3^Platelets^LN||20|g/L|||||F|||20250305080000+0800", "does not fit analyte"),
            ("OBX|1|NM|777-3^Platelets^LN||20||||||F|||20250305080000+0800", "OBX-6 units are empty"),
            ("OBX|1|NM|777-3^Platelets^LN||20|10*9/L|normal||||F|||20250305080000+0800", "OBX-7"),
            ("OBX|1|NM|777-3^Platelets^LN||20|10*9/L|||||W|||20250305080000+0800", "OBX-11"),
            ("OBX|1|SN|777-3^Platelets^LN||<^10|10*9/L|||||F|||20250305080000+0800", "comparator"),
            ("OBX|1|TX|777-3^Platelets^LN||low|10*9/L|||||F|||20250305080000+0800", "not numeric"),
            ("OBX|1|NM|777-3^Platelets^LN||-1|10*9/L|||||F|||20250305080000+0800", "value"),
            ("OBX|1|NM|777-3^Platelets^LN||20|10*9/L|||||F|||20250305", "to the minute"),
            ("OBX|1|NM|777-3^Platelets^LN||20|10*9/L|||||F|||20250231080000+0800", "not a valid date-time"),
        ],
    )
    def test_a_bad_result_is_an_application_error_and_nothing_is_published(self, obx: str, expected: str) -> None:
        outcome = map_oru(oru(PLATELETS.replace("OBX|1|", "OBX|9|"), obx), MAPPING)
        assert ("AE", ()) == (outcome.ack_code, outcome.events)
        assert expected in outcome.reason

    def test_unescaped_caret_in_unit_gets_a_hint(self) -> None:
        outcome = map_oru(oru("OBX|1|NM|777-3^Platelets^LN||20|10^9/L|||||F|||20250305080000+0800"), MAPPING)
        assert "AE" == outcome.ack_code
        assert "\\S\\" in outcome.reason

    def test_local_looking_loinc_without_ln_system_is_unknown(self) -> None:
        outcome = map_oru(oru("OBX|1|NM|777-3^Platelets^||20|10*9/L|||||F|||20250305080000+0800"), MAPPING)
        assert "AE" == outcome.ack_code

    def test_time_without_any_offset_is_an_error(self) -> None:
        message = oru(PLATELETS.replace("20250305080000+0800", "202503050800")).replace(
            "20250305103000+0800", "20250305103000"
        )
        outcome = map_oru(message, MAPPING)
        assert "AE" == outcome.ack_code
        assert "offset" in outcome.reason

    def test_unmapped_patient_is_ae_and_the_record_number_is_not_echoed(self) -> None:
        outcome = map_oru(oru(PLATELETS, mrn="MRN0999"), MAPPING)
        assert ("AE", ()) == (outcome.ack_code, outcome.events)
        assert "not enrolled" in outcome.reason
        ack = ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC))
        assert "MRN0999" not in ack

    def test_identifiers_mapping_to_two_subjects_are_an_error(self) -> None:
        pid = "PID|1||MRN0001^^^GZH^MR~MRN0002^^^OTHER^MR"
        outcome = map_oru(oru(PLATELETS, pid=pid), MAPPING)
        assert "AE" == outcome.ack_code
        assert "MRN000" not in outcome.reason

    def test_second_identifier_repetition_is_looked_up(self) -> None:
        pid = "PID|1||X-77^^^OTHER^PI~MRN0002^^^GZH^MR"
        assert "TW-102" == only_lab(map_oru(oru(PLATELETS, pid=pid), MAPPING)).subject_id

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("hello world", "does not start with an MSH"),
            ("MSH|^~\\&|LIS|GZH|||20250305||ADT^A01|MSG9|P|2.5.1\rPID|1||MRN0001", "not ORU^R01"),
            ("MSH|^~\\&|LIS|GZH|||20250305||ORU^R01||P|2.5.1\rPID|1||MRN0001", "MSH-10"),
            ("MSH|^~\\&|LIS|GZH|||20250305||ORU^R01|MSG9|P|2.5.1\r" + PLATELETS, "before any PID"),
            ("MSH|", "parseable"),
        ],
    )
    def test_what_is_not_an_oru_r01_is_rejected(self, text: str, expected: str) -> None:
        outcome = map_oru(text, MAPPING)
        assert "AR" == outcome.ack_code
        assert expected in outcome.reason


class TestAck:
    """The ACK echoes MSH-10 in MSA-2 and says what happened in MSA-3."""

    def test_accepted_ack(self) -> None:
        ack = ack_message(map_oru(oru(PLATELETS, control="CTRL-42"), MAPPING), datetime(2025, 3, 5, 2, 30, tzinfo=UTC))
        msh, msa = ack.rstrip("\r").split("\r")
        assert msh.startswith("MSH|^~\\&|TRIALWATCH|TW|LIS|GZH|20250305023000+0000||ACK^R01^ACK|ACKCTRL-42|P|2.5.1")
        assert "MSA|AA|CTRL-42|accepted: 1 result(s) published, 0 not monitored" == msa

    def test_reason_text_is_escaped(self) -> None:
        outcome = map_oru(oru("OBX|1|NM|A|B^Weird^L||5|U/L|||||F|||20250305080000+0800"), MAPPING)
        msa = ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC)).split("\r")[1]
        assert 4 == len(msa.split("|")), msa

    def test_unparseable_message_still_echoes_a_readable_msh10(self) -> None:
        outcome = map_oru("MSH|^~\\&|LIS|GZH|||20250305||XYZ^Q01|CTRL-9|P|2.5.1", MAPPING)
        assert "MSA|AR|CTRL-9|" in ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC))


class TestSplitMessages:
    """A file holds messages separated by blank lines, or MLLP-framed."""

    def test_blank_line_separated_with_lf_segments(self) -> None:
        text = oru(PLATELETS).replace("\r", "\n") + "\n\n" + oru(PLATELETS, control="M2").replace("\r", "\n") + "\n"
        assert [oru(PLATELETS), oru(PLATELETS, control="M2")] == split_messages(text)

    def test_mllp_framed(self) -> None:
        text = "\x0b" + oru(PLATELETS) + "\x1c\r\x0b" + oru(PLATELETS, control="M2") + "\x1c\r"
        assert [oru(PLATELETS), oru(PLATELETS, control="M2")] == split_messages(text)


class TestMappingFile:
    """The mapping file is checked on load and its errors never name a record number."""

    def test_valid_file(self, tmp_path: Path) -> None:
        path = tmp_path / "map.toml"
        path.write_text(
            'site_id = "SITE-GZ"\nignore_codes = ["2951-2"]\n'
            '[subjects]\nMRN0001 = "TW-101"\n[local_codes]\nPLT = "platelets"\n'
        )
        mapping = load_mapping(path)
        assert ("TW-101", "platelets", True) == (
            mapping.subject_for(["MRN0001"]),
            mapping.analyte_for("PLT", is_loinc=False),
            mapping.ignores("2951-2"),
        )

    def test_bad_subject_entry_is_reported_without_the_record_number(self, tmp_path: Path) -> None:
        path = tmp_path / "map.toml"
        path.write_text('site_id = "SITE-GZ"\n[subjects]\nMRN0001 = ""\n')
        with pytest.raises(MappingFileError) as error:
            load_mapping(path)
        assert "subjects" in str(error.value)
        assert "MRN0001" not in str(error.value)

    def test_unknown_analyte_in_local_codes(self, tmp_path: Path) -> None:
        path = tmp_path / "map.toml"
        path.write_text('site_id = "SITE-GZ"\n[local_codes]\nNA = "sodium"\n')
        with pytest.raises(MappingFileError, match=r"local_codes\.NA"):
            load_mapping(path)


def with_value(value: str) -> str:
    """A platelets message whose OBX-5 is `value` (wire text, escapes as written)."""
    return oru(PLATELETS.replace("||20|", f"||{value}|"))


class TestEveryMessageIsAnswered:
    """Issue 10, defect 6: the mapping is total; a bad field is AE naming the field, never an exception."""

    @pytest.mark.parametrize(
        ("message", "expected"),
        [
            # python-hl7 raises ValueError on a formatting command with a non-numeric count.
            (with_value("\\.spZ\\"), "OBX-5"),
            (with_value("2\\.in1x\\0"), "OBX-5"),
            # timezone() raises ValueError for offsets of 24 h or more.
            (oru(PLATELETS).replace("20250305103000+0800", "20250305103000+2400"), "MSH-7"),
            (oru(PLATELETS.replace("080000+0800", "080000-2500")), "OBX-14"),
            (oru(PLATELETS.replace("080000+0800", "080000+0860")), "OBX-14"),
            # python-hl7 drops what it cannot unescape, so these read as "20": a value the sender never sent.
            (with_value("2\\Z\\0"), "OBX-5"),
            (with_value("2\\XZZ\\0"), "OBX-5"),
            (with_value("2\\C2842\\0"), "OBX-5"),
            (with_value("2\\\\0"), "OBX-5"),
            (with_value("20\\"), "OBX-5"),
            (with_value("2\\0"), "OBX-5"),
        ],
    )
    def test_a_field_python_hl7_cannot_read_is_an_error(self, message: str, expected: str) -> None:
        outcome = map_oru(message, MAPPING)
        assert ("AE", ()) == (outcome.ack_code, outcome.events), outcome.reason
        assert expected in outcome.reason
        assert ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC)).startswith("MSH|")

    @pytest.mark.parametrize("sequence", ["\\.in50000000\\", "\\.sp50000000\\", "\\.ti50000000\\", "\\.sk50000000\\"])
    def test_escape_expansion_is_bounded(self, sequence: str) -> None:
        # python-hl7 expands \.in50000000\ to 200 million characters (then strip() leaves '').
        tracemalloc.start()
        try:
            outcome = map_oru(with_value(sequence), MAPPING)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert ("AE", "OBX-5") == (outcome.ack_code, outcome.reason.split(": ")[1][:5]), outcome.reason
        assert peak < 8 << 20, f"{peak:,} bytes"

    @pytest.mark.parametrize(("value", "expected"), [("\\X32\\0", 20.0), ("2\\.in4\\0", None), ("\\H\\20\\N\\", None)])
    def test_bounded_escapes_read_as_python_hl7_reads_them(self, value: str, expected: float | None) -> None:
        # \X32\ is "2"; an indent inside a number or highlighting ("_" in python-hl7) is no number.
        outcome = map_oru(with_value(value), MAPPING)
        if expected is None:
            assert ("AE", "not a number") == (outcome.ack_code, outcome.reason[-12:]), outcome.reason
        else:
            assert expected == only_lab(outcome).value

    def test_too_many_segments_are_rejected_before_parsing(self) -> None:
        # 789 kB, 10,000 OBX: held the event loop 2.1 s in python-hl7.
        obx = [PLATELETS.replace("OBX|1|", f"OBX|{n}|") for n in range(1, 10_001)]
        outcome = map_oru(oru(*obx), MAPPING)
        assert "AR" == outcome.ack_code
        assert "segments" in outcome.reason

    def test_a_delimiter_bomb_is_rejected_before_parsing(self) -> None:
        # python-hl7 builds an object per delimiter: 1 MiB of '|' took 450 MiB and 19 s.
        outcome = map_oru(oru(PLATELETS + "|" * 300_000), MAPPING)
        assert "AR" == outcome.ack_code
        assert "delimiters" in outcome.reason

    def test_a_set_id_that_is_no_hl7_sequence_id_is_an_error(self) -> None:
        # It becomes part of the event id, which the model copy once took past the contract's bound.
        outcome = map_oru(oru(PLATELETS.replace("OBX|1|", "OBX|" + "7" * 200_000 + "|")), MAPPING)
        assert ("AE", ()) == (outcome.ack_code, outcome.events)
        assert "OBX-1: set ID" in outcome.reason

    def test_framing_bytes_in_echoed_fields_are_escaped(self) -> None:
        # MSH-4 echoed raw in MSH-6 put MLLP's start and end blocks in the middle of the ACK.
        outcome = map_oru(oru(PLATELETS).replace("|LIS|GZH|", "|LIS|G\x0bZ\x1cH|", 1), MAPPING)
        ack = ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC))
        assert "\x1c" not in ack
        assert "\x0b" not in ack
        assert "|LIS|G\\X0B\\Z\\X1C\\H|" in ack

    def test_echoed_text_is_bounded(self) -> None:
        outcome = map_oru(with_value("x" * 500_000), MAPPING)
        assert "AE" == outcome.ack_code
        assert len(ack_message(outcome, datetime(2025, 3, 5, tzinfo=UTC))) < 2_000


class TestTheCommandGoesOn:
    """Issue 10, defect 6: `trialwatch hl7 FILE` reports a bad message and goes on to the next."""

    def test_messages_that_raised_are_reported_and_the_rest_are_sent(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        mapping = tmp_path / "mapping.toml"
        mapping.write_text('site_id = "SITE-GZ"\n[subjects]\nMRN0001 = "TW-101"\n')
        messages = [
            oru(PLATELETS, control="M1").encode(),
            with_value("\\.spZ\\").replace("MSG0001", "M2").encode(),
            oru(PLATELETS, control="M3").replace("+0800||", "+2400||", 1).encode(),
            with_value("2\xff0").replace("MSG0001", "M4").encode("latin-1"),
            oru(PLATELETS, control="M5").encode(),
        ]
        path = tmp_path / "in.hl7"
        path.write_bytes(b"\n\n".join(m.replace(b"\r", b"\n") for m in messages) + b"\n")

        code = main(["hl7", str(path), "--mapping", str(mapping), "--dry-run"])

        out, err = capsys.readouterr()
        assert 1 == code
        assert ["hl7:M1:1:1", "hl7:M5:1:1"] == [json.loads(line)["value"]["event_id"] for line in out.splitlines()]
        assert ["AA", "AE", "AE", "AR", "AA"] == [line.split(": ")[1].split(" ")[0] for line in err.splitlines()[:5]]
        assert "accepted 2, errors (AE) 2, rejected (AR) 1" in err


# Synthetic: a made-up record number in the shape of the one the fuzz run leaked.
LEAKED_MRN = "MRN8675309"


class TestNoRecordNumberInLogs:
    """Issue 10, defect 7: nothing the adapter or python-hl7 logs carries a PID-3 value."""

    @pytest.mark.parametrize("suffix", ["\\Z\\", "\\C2842\\", "\\M2442\\", "\\XZZ\\", "\\\\", "\\.spZ\\", "\\"])
    async def test_a_bad_escape_in_pid3_leaves_the_record_number_out_of_every_log(
        self, suffix: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
    ) -> None:
        caplog.set_level(logging.DEBUG)
        logger = structlog.wrap_logger(
            structlog.PrintLogger(sys.stderr), processors=[structlog.processors.KeyValueRenderer()]
        )
        intake = Hl7Intake(MAPPING, EventFileSink(io.StringIO()), logger=logger)
        answer = await intake.handle(oru(PLATELETS, pid=f"PID|1||{LEAKED_MRN}{suffix}^^^GZH^MR"))
        out, err = capsys.readouterr()
        assert answer.ack_code in ("AE", "AR")
        assert "hl7_message_refused" in err  # the intake did log, without the number
        seen = caplog.text + out + err + answer.ack
        assert "8675309" not in seen

    def test_python_hl7s_own_logger_reaches_no_handler(
        self, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # Even code that calls the library's unescaping directly logs nothing anyone sees.
        caplog.set_level(logging.DEBUG)
        pid = hl7.parse(oru(PLATELETS, pid=f"PID|1||{LEAKED_MRN}\\Z\\^^^GZH^MR")).segment("PID")
        assert LEAKED_MRN == pid.extract_field(1, 3, 1, 1)
        out, err = capsys.readouterr()
        assert [] == [r.getMessage() for r in caplog.records if "8675309" in r.getMessage()]
        assert "8675309" not in out + err
