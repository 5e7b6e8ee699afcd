"""The MLLP listener over a real TCP socket on loopback, with a fake publisher in place of Kafka."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from tests.unit.test_hl7_adapter import MAPPING, PLATELETS, oru, with_value
from trialwatch.adapters.mllp import Hl7Intake, start_listener
from trialwatch.cli import main


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


StartListener = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def start() -> AsyncIterator[StartListener]:
    """Starts listeners with the limits a test names (`idle_timeout=0.3`, ...); stops them after the test."""
    servers: list[asyncio.Server] = []

    async def start_with(**limits: Any) -> Listener:
        publisher = FakePublisher()
        server = await start_listener(Hl7Intake(MAPPING, publisher), "127.0.0.1", 0, **limits)
        servers.append(server)
        return Listener(server.sockets[0].getsockname()[1], publisher)

    yield start_with
    for server in servers:
        server.close()
        await server.wait_closed()


async def closed_by_listener(conn: Connection, within: float = 3.0) -> bytes:
    """What the listener sent before closing the connection; fails if it is still open after `within` s."""
    return await asyncio.wait_for(conn.reader.read(), timeout=within)


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


class TestEveryFrameIsAnswered:
    """Issue 10, defect 6 over the wire: a message that made the mapping raise still gets its ACK."""

    async def test_messages_that_raised_get_an_ae_and_the_connection_goes_on(self, listener: Listener) -> None:
        conn = await listener.connect()
        assert ["AE", "MSG0001"] == msa(await conn.send(with_value("\\.spZ\\")))[1:3]
        bad_offset = oru(PLATELETS, control="MSG-TZ").replace("+0800||", "+2400||", 1)
        assert ["AE", "MSG-TZ"] == msa(await conn.send(bad_offset))[1:3]
        assert "AE" == msa(await conn.send(with_value("\\.in50000000\\")))[1]
        assert ["AA", "MSG-OK"] == msa(await conn.send(oru(PLATELETS, control="MSG-OK")))[1:3]
        await conn.close()
        assert ["hl7:MSG-OK:1:1"] == [v["event_id"] for _, v in listener.publisher.sent]


class TestLimits:
    """Issue 10, defect 9: idle timeout, connection cap, frame limit, and parsing off the event loop."""

    async def test_an_idle_connection_is_closed(self, start: StartListener) -> None:
        listener = await start(idle_timeout=0.3)
        conn = await listener.connect()
        assert b"" == await closed_by_listener(conn)

    async def test_a_frame_without_an_end_block_is_not_held(self, start: StartListener) -> None:
        listener = await start(idle_timeout=0.3)
        conn = await listener.connect()
        conn.writer.write(b"\x0b" + oru(PLATELETS).encode())
        await conn.writer.drain()
        assert b"" == await closed_by_listener(conn)

    async def test_a_connection_that_keeps_sending_messages_stays_open(self, start: StartListener) -> None:
        listener = await start(idle_timeout=0.5)
        conn = await listener.connect()
        for n in range(4):
            await asyncio.sleep(0.3)
            assert "AA" == msa(await conn.send(oru(PLATELETS, control=f"KEEP-{n}")))[1]
        await conn.close()

    async def test_connections_past_the_cap_are_closed_at_once(self, start: StartListener) -> None:
        listener = await start(max_connections=2)
        first, second = await listener.connect(), await listener.connect()
        assert "AA" == msa(await first.send(oru(PLATELETS, control="CAP-1")))[1]
        assert "AA" == msa(await second.send(oru(PLATELETS, control="CAP-2")))[1]
        third = await listener.connect()
        assert b"" == await closed_by_listener(third, within=1.0)
        assert "AA" == msa(await first.send(oru(PLATELETS, control="CAP-3")))[1]
        await first.close()
        # A place is free again once the listener has seen the close.
        for _ in range(50):
            fourth = await listener.connect()
            try:
                assert "AA" == msa(await fourth.send(oru(PLATELETS, control="CAP-4")))[1]
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                await asyncio.sleep(0.05)
        else:
            pytest.fail("no connection accepted after one closed")
        await fourth.close()
        await second.close()

    async def test_an_oversize_frame_with_a_readable_header_gets_an_ar_and_the_connection_goes_on(
        self, start: StartListener
    ) -> None:
        listener = await start(max_message_bytes=4096)
        conn = await listener.connect()
        big = oru(*[PLATELETS.replace("OBX|1|", f"OBX|{n}|") for n in range(1, 1000)], control="BIG-1")
        assert ["AR", "BIG-1", "message larger than 4,096 bytes"] == msa(await conn.send(big))[1:4]
        assert ["AA", "SMALL-1"] == msa(await conn.send(oru(PLATELETS, control="SMALL-1")))[1:3]
        await conn.close()
        assert ["hl7:SMALL-1:1:1"] == [v["event_id"] for _, v in listener.publisher.sent]

    async def test_an_oversize_frame_without_a_header_is_closed(self, start: StartListener) -> None:
        listener = await start(max_message_bytes=4096)
        conn = await listener.connect()
        conn.writer.write(b"\x0b" + b"x" * 20_000)
        await conn.writer.drain()
        assert b"" == await closed_by_listener(conn)

    async def test_a_heavy_message_does_not_hold_up_other_connections(self, listener: Listener) -> None:
        # 990 OBX: about 0.3 s of python-hl7 and mapping, within the limits.
        heavy = oru(*[PLATELETS.replace("OBX|1|", f"OBX|{n}|") for n in range(1, 991)], control="HEAVY")
        slow, quick = await listener.connect(), await listener.connect()
        heavy_ack = asyncio.create_task(slow.send(heavy))
        await asyncio.sleep(0.02)
        assert "AA" == msa(await quick.send(oru(PLATELETS, control="QUICK")))[1]
        assert not heavy_ack.done(), "the quick message was answered only after the heavy one"
        assert "AA" == msa(await heavy_ack)[1]
        await slow.close()
        await quick.close()


class TestCommandLimits:
    """`trialwatch hl7 --listen` takes the limits as options and refuses ones that would close every connection."""

    @pytest.mark.parametrize("option", [["--idle-timeout", "0"], ["--max-connections", "0"]])
    def test_a_limit_that_serves_nobody_is_a_usage_error(
        self, option: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert 2 == main(["hl7", "--listen", "2575", *option, "--mapping", "absent.toml"])
        assert "--idle-timeout must be above 0" in capsys.readouterr().err
