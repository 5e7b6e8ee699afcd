"""The MLLP listener: HL7 v2 over TCP, one ACK per message, re-sent messages answered idempotently."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from trialwatch.adapters import EventSink
from trialwatch.adapters.hl7v2 import (
    MLLP_END,
    MLLP_START,
    AckCode,
    MessageHeader,
    OruOutcome,
    ack_message,
    ack_text,
    map_oru,
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
    ) -> None:
        self._log = logger if logger is not None else log
        self._mapping = mapping
        self._sink = sink
        self._clock = clock
        self._remember = remember
        self._accepted: OrderedDict[tuple[str, str, str], tuple[str, Answer]] = OrderedDict()
        # One message at a time: a re-send racing its original on another
        # connection must find the original remembered, not publish twice.
        self._lock = asyncio.Lock()

    def refuse(self, reason: str) -> Answer:
        """The AR for something that never became a message (bad framing, bad encoding)."""
        self._log.warning("hl7_message_refused", ack_code="AR", reason=reason)
        return _answer(OruOutcome(MessageHeader(), "AR", reason=reason), self._clock())

    async def handle(self, text: str) -> Answer:
        """Map, publish and answer one message; a message accepted before gets its first answer again."""
        async with self._lock:
            return await self._handle(text)

    async def _handle(self, text: str) -> Answer:
        outcome = map_oru(text, self._mapping)
        h = outcome.header
        bound = self._log.bind(control_id=h.control_id, sending_application=h.sending_application)
        if outcome.ack_code != "AA":
            bound.warning("hl7_message_refused", ack_code=outcome.ack_code, reason=outcome.reason)
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


async def _connection(
    intake: Hl7Intake, encoding: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                block = await reader.readuntil(MLLP_END)
            except asyncio.IncompleteReadError:
                return  # the peer closed the connection (between messages, or mid-block)
            except asyncio.LimitOverrunError:
                # The end of this block cannot be found within the limit, so
                # there is no way to resynchronise: answer and close.
                writer.write(_frame(intake.refuse(f"message larger than {MAX_MESSAGE_BYTES} bytes").ack, encoding))
                await writer.drain()
                return
            start = block.rfind(MLLP_START)
            if start < 0:
                answer = intake.refuse("not MLLP framed: no start block (0x0B) before the end block")
            else:
                payload = block[start + 1 : -len(MLLP_END)]
                try:
                    text = payload.decode(encoding)
                except UnicodeDecodeError:
                    answer = intake.refuse(f"message is not {encoding} text")
                else:
                    answer = await intake.handle(text)
            writer.write(_frame(answer.ack, encoding))
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _frame(ack: str, encoding: str) -> bytes:
    return MLLP_START + ack.encode(encoding, errors="replace") + MLLP_END


async def start_listener(intake: Hl7Intake, host: str, port: int, encoding: str = "utf-8") -> asyncio.Server:
    """Start listening (port 0 picks a free one); each connection may carry any number of messages."""
    server = await asyncio.start_server(
        functools.partial(_connection, intake, encoding), host, port, limit=MAX_MESSAGE_BYTES
    )
    log.info("mllp_listening", host=host, port=server.sockets[0].getsockname()[1])
    return server
