"""The MLLP listener over a real TCP socket on loopback, with a fake publisher in place of Kafka."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

from tests.unit.test_hl7_adapter import MAPPING, PLATELETS, oru
from trialwatch.adapters.mllp import Hl7Intake, start_listener


@dataclass
class FakePublisher:
    """Records what it is asked to publish; `fail` makes the next publishes raise as Kafka would."""

    sent: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    fail: bool = False

    async def publish(self, topic: str, value: BaseModel) -> None:
        if self.fail:
            raise ConnectionError("broker unavailable")
        self.sent.append((topic, json.loads(value.model_dump_json(exclude_unset=True))))


@dataclass
class Listener:
    port: int
    publisher: FakePublisher

    async def connect(self) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return Connection(reader, writer)


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send_raw(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        block = await asyncio.wait_for(self.reader.readuntil(b"\x1c\x0d"), timeout=5)
        assert block.startswith(b"\x0b"), block
        return block[1:-2].decode()

    async def send(self, message: str) -> str:
        return await self.send_raw(b"\x0b" + message.encode() + b"\x1c\x0d")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    publisher = FakePublisher()
    server = await start_listener(Hl7Intake(MAPPING, publisher), "127.0.0.1", 0)
    try:
        yield Listener(server.sockets[0].getsockname()[1], publisher)
    finally:
        server.close()
        await server.wait_closed()


def msa(ack: str) -> list[str]:
    segment = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    return segment.split("|")


class TestListener:
    """Every message gets an ACK over the same connection; the listener outlives bad input."""

    async def test_accepted_message_is_published_and_answered_aa(self, listener: Listener) -> None:
        conn = await listener.connect()
        ack = await conn.send(oru(PLATELETS, control="MSG-A"))
        await conn.close()
        assert ["MSA", "AA", "MSG-A"] == msa(ack)[:3]
        assert [("trial.labs.v1", "hl7:MSG-A:1:1", "TW-101", 20.0)] == [
            (topic, v["event_id"], v["subject_id"], v["value"]) for topic, v in listener.publisher.sent
        ]

    async def test_malformed_message_is_answered_and_the_connection_goes_on(self, listener: Listener) -> None:
        conn = await listener.connect()
        assert "AR" == msa(await conn.send("this is not HL7"))[1]
        assert ["AE", "MSG-B"] == msa(await conn.send(oru(PLATELETS, control="MSG-B", mrn="MRN0999")))[1:3]
        assert ["AA", "MSG-C"] == msa(await conn.send(oru(PLATELETS, control="MSG-C")))[1:3]
        await conn.close()
        assert ["hl7:MSG-C:1:1"] == [v["event_id"] for _, v in listener.publisher.sent]

    async def test_unframed_bytes_get_an_ar_and_a_new_connection_still_works(self, listener: Listener) -> None:
        conn = await listener.connect()
        assert "AR" == msa(await conn.send_raw(b"no start block\x1c\x0d"))[1]
        await conn.close()
        conn = await listener.connect()
        assert "AA" == msa(await conn.send(oru(PLATELETS, control="MSG-D")))[1]
        await conn.close()

    async def test_bytes_that_are_not_utf8_are_rejected(self, listener: Listener) -> None:
        conn = await listener.connect()
        assert "AR" == msa(await conn.send_raw(b"\x0bMSH|\xff\xfe\x1c\x0d"))[1]
        await conn.close()

    async def test_client_vanishing_mid_message_does_not_stop_the_listener(self, listener: Listener) -> None:
        conn = await listener.connect()
        conn.writer.write(b"\x0b" + oru(PLATELETS).encode()[:40])
        await conn.close()
        conn = await listener.connect()
        assert "AA" == msa(await conn.send(oru(PLATELETS, control="MSG-E")))[1]
        await conn.close()

    async def test_the_record_number_is_in_no_ack(self, listener: Listener) -> None:
        conn = await listener.connect()
        acks = [
            await conn.send(oru(PLATELETS, control="MSG-F")),
            await conn.send(oru(PLATELETS, control="MSG-G", mrn="MRN0999")),
        ]
        await conn.close()
        assert not any("MRN0001" in a or "MRN0999" in a for a in acks), acks
        assert "MRN0001" not in json.dumps(listener.publisher.sent)


class TestResend:
    """A re-sent MSH-10 is answered as the first time and published once."""

    async def test_resent_message_gets_the_same_ack_and_one_publish(self, listener: Listener) -> None:
        first = await listener.connect()
        ack1 = await first.send(oru(PLATELETS, control="MSG-R"))
        await first.close()
        # Interface engines re-send on a new connection after a lost ACK.
        second = await listener.connect()
        ack2 = await second.send(oru(PLATELETS, control="MSG-R"))
        await second.close()
        assert "AA" == msa(ack1)[1]
        assert ack1 == ack2
        assert 1 == len(listener.publisher.sent)

    async def test_reused_msh10_with_other_results_is_an_error(self, listener: Listener) -> None:
        conn = await listener.connect()
        await conn.send(oru(PLATELETS, control="MSG-S"))
        ack = await conn.send(oru(PLATELETS.replace("||20|", "||200|"), control="MSG-S"))
        await conn.close()
        assert ["AE", "MSG-S"] == msa(ack)[1:3]
        assert [20.0] == [v["value"] for _, v in listener.publisher.sent]

    async def test_publish_failure_is_ar_and_the_resend_publishes(self, listener: Listener) -> None:
        conn = await listener.connect()
        listener.publisher.fail = True
        assert "AR" == msa(await conn.send(oru(PLATELETS, control="MSG-T")))[1]
        listener.publisher.fail = False
        assert "AA" == msa(await conn.send(oru(PLATELETS, control="MSG-T")))[1]
        await conn.close()
        assert ["hl7:MSG-T:1:1"] == [v["event_id"] for _, v in listener.publisher.sent]
