"""The MLLP listener: HL7 v2 over TCP, one ACK per message, re-sent messages answered idempotently.

Bounded whatever the peers do: at most `max_connections` connections (others
are closed as they arrive), a message must arrive complete within
`idle_timeout` seconds of the connection's last answer (or its opening), a
frame may hold at most `max_message_bytes` (a larger one is read past without
being kept and answered AR, or the connection closed when its MSH cannot be
read), and messages are mapped in worker threads, a few at a time, so a heavy
one holds up no other connection.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from trialwatch.adapters import EventSink
from trialwatch.adapters.hl7v2 import (
    HEADER_SCAN,
    INTERNAL_ERROR,
    MLLP_END,
    MLLP_START,
    AckCode,
    MessageHeader,
    OruOutcome,
    ack_message,
    ack_text,
    map_oru,
    read_header,
)
from trialwatch.adapters.mapping import AdapterMapping
from trialwatch.contract import LABS

log = structlog.get_logger("trialwatch.mllp")

# How many accepted control ids the listener remembers to answer re-sends
# without publishing again. Interface engines re-send within minutes; after a
# restart (or beyond this many) a re-send is published again, and the events'
# deterministic ids make the worker ignore it.
REMEMBERED_MESSAGES = 10_000

# An ORU^R01 of a few panels is a few KiB; 1 MiB leaves room for embedded
# reports while keeping one connection from holding the listener's memory.
MAX_MESSAGE_BYTES = 1 << 20
# A site's interface engine keeps one or a few connections open; 64 of them at
# 1 MiB each is the most memory peers can make the listener hold.
MAX_CONNECTIONS = 64
# Seconds a connection may take to deliver its next complete message
# (engines that keep a connection open send a message at least this often or
# reconnect when they need to).
IDLE_TIMEOUT_S = 60.0
# Messages mapped at once: python-hl7 is pure Python, so more threads would
# only share the same core while each holds a parsed message in memory.
PARSERS = 2


@dataclass(frozen=True)
class Answer:
    """The ACK for one message, and what it says, for the command's report."""

    ack_code: AckCode
    control_id: str
    text: str
    ack: str


def _answer(outcome: OruOutcome, now: datetime) -> Answer:
    ack = ack_message(outcome, now)
    return Answer(outcome.ack_code, outcome.control_id, ack_text(outcome), ack)


class Hl7Intake:
    """Answers one message at a time: map it, publish its events, remember it, return the ACK text."""

    def __init__(
        self,
        mapping: AdapterMapping,
        sink: EventSink,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        remember: int = REMEMBERED_MESSAGES,
        logger: Any = None,
        parsers: int = PARSERS,
    ) -> None:
        self._log = logger if logger is not None else log
        self._mapping = mapping
        self._sink = sink
        self._clock = clock
        self._remember = remember
        self._accepted: OrderedDict[tuple[str, str, str], tuple[str, Answer]] = OrderedDict()
        # Publishing one message at a time: a re-send racing its original on
        # another connection must find the original remembered, not publish twice.
        self._lock = asyncio.Lock()
        self._parsing = asyncio.Semaphore(parsers)

    def refuse(self, reason: str, header: MessageHeader | None = None) -> Answer:
        """The AR for something that never became a message (bad framing, bad encoding, too large)."""
        header = header or MessageHeader()
        self._log.warning("hl7_message_refused", ack_code="AR", control_id=header.control_id, reason=reason)
        return _answer(OruOutcome(header, "AR", reason=reason), self._clock())

    async def handle(self, text: str) -> Answer:
        """Map, publish and answer one message; a message accepted before gets its first answer again.

        Never raises: whatever goes wrong, the message is answered.
        """
        try:
            # In a thread: parsing a large message would otherwise stall every connection.
            async with self._parsing:
                outcome = await asyncio.to_thread(map_oru, text, self._mapping)
            async with self._lock:
                return await self._handle(outcome)
        except Exception as exc:  # noqa: BLE001 (an unanswered message is re-sent forever)
            self._log.error("hl7_message_failed", error=type(exc).__name__)
            reason = f"{INTERNAL_ERROR} ({type(exc).__name__}); it may not have been published, re-send it later"
            return _answer(OruOutcome(MessageHeader(), "AR", reason=reason), self._clock())

    async def _handle(self, outcome: OruOutcome) -> Answer:
        h = outcome.header
        bound = self._log.bind(control_id=h.control_id, sending_application=h.sending_application)
        if outcome.ack_code != "AA":
            failed = outcome.reason.startswith(INTERNAL_ERROR)
            (bound.error if failed else bound.warning)(
                "hl7_message_refused", ack_code=outcome.ack_code, reason=outcome.reason
            )
            return _answer(outcome, self._clock())

        key = (h.sending_application, h.sending_facility, h.control_id)
        remembered = self._accepted.get(key)
        if remembered is not None:
            fingerprint, answer = remembered
            if fingerprint == outcome.fingerprint():
                bound.info("hl7_message_resent", ack_code="AA", events=len(outcome.events))
                return answer
            reason = (
                f"MSH-10 {h.control_id!r} was already accepted for a message with different results; "
                "a new message needs a new control ID"
            )
            bound.warning("hl7_message_refused", ack_code="AE", reason=reason)
            return _answer(replace(outcome, ack_code="AE", events=(), reason=reason), self._clock())

        try:
            for event in outcome.events:
                await self._sink.publish(LABS, event)
        except Exception as exc:  # noqa: BLE001 (any failure to store is answered, never fatal to the listener)
            # AR: rejected for a reason unrelated to the content (HL7 v2
            # original mode), so the sender re-sends; the events that did get
            # through carry the same ids again and are ignored by the worker.
            bound.error("hl7_publish_failed", error=type(exc).__name__)
            reason = f"could not be stored ({type(exc).__name__}); re-send the message later"
            return _answer(replace(outcome, ack_code="AR", reason=reason), self._clock())

        answer = _answer(outcome, self._clock())
        self._accepted[key] = (outcome.fingerprint(), answer)
        if len(self._accepted) > self._remember:
            self._accepted.popitem(last=False)
        bound.info("hl7_message_accepted", ack_code="AA", events=len(outcome.events), ignored=outcome.ignored)
        return answer


@dataclass
class _Connections:
    """The listener's side of every connection: the cap, the deadlines, the frame limit."""

    intake: Hl7Intake
    encoding: str
    idle_timeout: float
    max_connections: int
    max_message_bytes: int
    open: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.open >= self.max_connections:
                log.warning("mllp_connection_refused", reason="too many connections", limit=self.max_connections)
                return
            self.open += 1
            try:
                await self._exchange(reader, writer)
            finally:
                self.open -= 1
        except (ConnectionError, TimeoutError):
            return
        except Exception as exc:  # noqa: BLE001 (one connection's failure must not reach the server)
            log.error("mllp_connection_failed", error=type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                block = await asyncio.wait_for(reader.readuntil(MLLP_END), self.idle_timeout)
            except TimeoutError:
                log.info("mllp_connection_idle", idle_timeout=self.idle_timeout)
                return
            except asyncio.IncompleteReadError:
                return  # the peer closed the connection (between messages, or mid-block)
            except asyncio.LimitOverrunError:
                answer = await self._oversize(reader)
                if answer is None:
                    return
            else:
                answer = await self._answer(block)
            await self._send(writer, answer)

    async def _answer(self, block: bytes) -> Answer:
        start = block.rfind(MLLP_START)
        if start < 0:
            return self.intake.refuse("not MLLP framed: no start block (0x0B) before the end block")
        try:
            text = block[start + 1 : -len(MLLP_END)].decode(self.encoding)
        except UnicodeDecodeError:
            return self.intake.refuse(f"message is not {self.encoding} text")
        return await self.intake.handle(text)

    async def _oversize(self, reader: asyncio.StreamReader) -> Answer | None:
        """A frame over the limit: AR once its end has been read past, or None (close) when its MSH is unreadable."""
        # Less than half the limit, so the end block (past the limit) is not in it.
        head = await reader.read(min(HEADER_SCAN, self.max_message_bytes // 2))
        start = head.find(MLLP_START)
        header = read_header(head[start + 1 :].decode(self.encoding, errors="replace")) if start >= 0 else None
        if header is None or not header.control_id:
            log.warning("mllp_frame_too_large", limit=self.max_message_bytes, answered=False)
            return None
        try:
            # Read past the rest without keeping it, so the connection can go on.
            await asyncio.wait_for(_skip_frame(reader), self.idle_timeout)
        except asyncio.IncompleteReadError:
            return None
        return self.intake.refuse(f"message larger than {self.max_message_bytes:,} bytes", header)

    async def _send(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        writer.write(_frame(answer.ack, self.encoding))
        # A peer that does not read its ACKs holds the connection no longer than an idle one.
        await asyncio.wait_for(writer.drain(), self.idle_timeout)


async def _skip_frame(reader: asyncio.StreamReader) -> None:
    """Discard bytes up to and including the next end block; never more than the reader's limit held at once."""
    while True:
        try:
            await reader.readuntil(MLLP_END)
            return
        except asyncio.LimitOverrunError as overrun:
            # The bytes before `consumed` cannot hold the (start of the) end block.
            await reader.readexactly(max(overrun.consumed, 1))


def _frame(ack: str, encoding: str) -> bytes:
    return MLLP_START + ack.encode(encoding, errors="replace") + MLLP_END


async def start_listener(
    intake: Hl7Intake,
    host: str,
    port: int,
    encoding: str = "utf-8",
    *,
    idle_timeout: float = IDLE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> asyncio.Server:
    """Start listening (port 0 picks a free one); each connection may carry any number of messages."""
    codecs.lookup(encoding)  # a misspelt encoding fails here, not on the first message
    connections = _Connections(intake, encoding, idle_timeout, max_connections, max_message_bytes)
    server = await asyncio.start_server(connections.serve, host, port, limit=max_message_bytes)
    log.info(
        "mllp_listening",
        host=host,
        port=server.sockets[0].getsockname()[1],
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_message_bytes=max_message_bytes,
    )
    return server
