"""HL7 v2 and FHIR in, alerts out: the adapters as operators run them, the real broker, a live worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.conftest import TRIALWATCH, enrollment, free_port, publish, read_topic, wait_consumed

pytestmark = pytest.mark.e2e

# Synthetic record numbers; the subject codes they map to are unique per test.
MRN = "MRN0001"


def mapping_file(tmp_path: Path, subject: str) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(f'site_id = "SITE-E2E"\nignore_codes = ["2951-2"]\n[subjects]\n{MRN} = "{subject}"\n')
    return path


def oru(control: str, obx: str, *, order: str = "FIL-E2E-1") -> bytes:
    segments = [
        f"MSH|^~\\&|LIS|GZH|TRIALWATCH|TW|20250302103000+0800||ORU^R01^ORU_R01|{control}|P|2.5.1",
        f"PID|1||{MRN}^^^GZH^MR||SYNTHETIC^PATIENT",
        f"OBR|1|PLC-1|{order}|58410-2^CBC^LN|||20250302080000+0800",
        obx,
    ]
    return b"\x0b" + "\r".join(segments).encode() + b"\x1c\x0d"


def msa(ack: bytes) -> list[str]:
    text = ack.strip(b"\x0b\x1c\x0d").decode()
    return next(s for s in text.split("\r") if s.startswith("MSA|")).split("|")


@pytest.fixture
def env(bootstrap: str) -> dict[str, str]:
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TRIALWATCH_LOG_FORMAT": "json"}


@pytest.fixture
def listener(env: dict[str, str], tmp_path: Path, subject_prefix: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    log = (tmp_path / "listener.log").open("wb")
    proc = subprocess.Popen(
        [TRIALWATCH, "hl7", "--listen", str(port), "--mapping", str(mapping_file(tmp_path, f"{subject_prefix}-h"))],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"listener exited: {(tmp_path / 'listener.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


async def exchange(port: int, *messages: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    acks = []
    try:
        for message in messages:
            writer.write(message)
            await writer.drain()
            acks.append(await asyncio.wait_for(reader.readuntil(b"\x1c\x0d"), timeout=30))
    finally:
        writer.close()
        await writer.wait_closed()
    return acks


def mine(subject: str) -> Any:
    return lambda v: v.get("subject_id") == subject


class TestHl7ThroughTheWorker:
    """An ORU^R01 over MLLP raises the platelet alert; its correction resolves it; a re-send publishes nothing."""

    async def test_oru_platelets_alert_and_correction(
        self,
        bootstrap: str,
        worker_factory: Any,
        producer: AIOKafkaProducer,
        subject_prefix: str,
        listener: tuple[int, subprocess.Popen[bytes]],
        tmp_path: Path,
    ) -> None:
        port, proc = listener
        subject = f"{subject_prefix}-h"
        worker = worker_factory()
        worker.start()
        await publish(producer, [enrollment(subject, "control")])
        await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")

        low = "OBX|1|NM|777-3^Platelets^LN||20|10\\S\\9/L|125-350|LL|||F|||20250302080000+0800"
        corrected = "OBX|1|NM|777-3^Platelets^LN||180|10\\S\\9/L|125-350||||C|||20250302080000+0800"
        acks = await exchange(
            port,
            oru(f"{subject}-m1", low),
            b"\x0bgarbage\x1c\x0d",
            oru(f"{subject}-m1", low),  # re-sent: the ACK was "lost"
        )
        assert ["AA", f"{subject}-m1"] == msa(acks[0])[1:3]
        assert "AR" == msa(acks[1])[1]
        assert acks[0] == acks[2]

        alerts = await read_topic(bootstrap, "trial.alerts.v1", mine(subject), lambda f: len(f) >= 1)
        assert [("lab.platelets.low", "critical", "firing", 1)] == [
            (a["rule"], a["severity"], a["status"], a["revision"]) for a in alerts
        ]

        (ack,) = await exchange(port, oru(f"{subject}-m2", corrected))
        assert "AA" == msa(ack)[1]
        alerts = await read_topic(bootstrap, "trial.alerts.v1", mine(subject), lambda f: len(f) >= 2)
        assert [("critical", "firing", 1), ("critical", "resolved", 2)] == [
            (a["severity"], a["status"], a["revision"]) for a in alerts
        ]

        labs = await read_topic(bootstrap, "trial.labs.v1", mine(subject), lambda f: len(f) >= 2, settle_s=2)
        assert [f"hl7:{subject}-m1:1:1", f"hl7:{subject}-m2:1:1"] == [v["event_id"] for v in labs]
        assert MRN not in json.dumps(labs) + json.dumps(alerts)

        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(timeout=30)
        assert MRN not in (tmp_path / "listener.log").read_text()


class TestFhirThroughTheWorker:
    """A FHIR Bundle's Observation and AdverseEvent raise the alerts the contract promises."""

    async def test_bundle_bilirubin_and_grade_4_adverse_event(
        self,
        bootstrap: str,
        worker_factory: Any,
        producer: AIOKafkaProducer,
        subject_prefix: str,
        env: dict[str, str],
        tmp_path: Path,
    ) -> None:
        subject = f"{subject_prefix}-f"
        worker = worker_factory()
        worker.start()
        await publish(producer, [enrollment(subject, "sbrt")])
        await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")

        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Observation",
                        "id": f"{subject}-tbil",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "1975-2"}]},
                        "subject": {"reference": f"Patient/{MRN}"},
                        "effectiveDateTime": "2025-03-02T08:00:00+08:00",
                        # 15 mg/dL against a ULN of 1.2 mg/dL: 12.5 x ULN, CTCAE grade 4.
                        "valueQuantity": {"value": 15, "system": "http://unitsofmeasure.org", "code": "mg/dL"},
                        "referenceRange": [{"high": {"value": 1.2, "code": "mg/dL"}}],
                    }
                },
                {
                    "resource": {
                        "resourceType": "AdverseEvent",
                        "id": f"{subject}-ae",
                        "actuality": "actual",
                        "extension": [
                            {
                                "url": "https://trialwatch.invalid/fhir/StructureDefinition/ctcae-grade",
                                "valueInteger": 4,
                            }
                        ],
                        "event": {"text": "Platelet count decreased"},
                        "subject": {"identifier": {"value": MRN}},
                        "date": "2025-03-02T09:00:00+08:00",
                        "seriousness": {"coding": [{"code": "non-serious"}]},
                        "suspectEntity": [
                            {
                                "instance": {"reference": "Medication/regorafenib"},
                                "causality": [{"assessment": {"coding": [{"code": "Possible"}]}}],
                            }
                        ],
                    }
                },
            ],
        }
        path = tmp_path / "bundle.json"
        path.write_text(json.dumps(bundle))
        done = subprocess.run(
            [TRIALWATCH, "fhir", str(path), "--mapping", str(mapping_file(tmp_path, subject))],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert 0 == done.returncode, done.stderr
        assert MRN not in done.stdout + done.stderr

        alerts = await read_topic(bootstrap, "trial.alerts.v1", mine(subject), lambda f: len(f) >= 2, settle_s=3)
        assert {("lab.bilirubin.high", "critical", 4), ("ae.grade3plus", "critical", 4)} == {
            (a["rule"], a["severity"], a["ctcae_grade"]) for a in alerts
        }
