"""The MLLP listener over a real loopback socket: framed mutated messages, split, pipelined, partial and oversize.

`setup` starts the real listener (its default limits) in an event loop of its
own thread; inputs are sent from this thread with plain sockets. Every
complete frame (every end block the listener can find within the frame
limit) must be answered by an ACK on the same connection, in order; an
oversize frame is answered AR when its MSH can be read, and the connection is
closed. After an input that makes the listener close the connection, a fresh
connection must still be served. Outcome: accepted when every ACK is AA, else
refused with the first other ACK code and the kind of reason (or what the
listener did); the sizes are those of the ACKs and of the published events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel

from tests.fuzz.harness import Outcome, Surface, mutate_bytes
from tests.fuzz.surfaces import hl7 as hl7_surface
from tests.unit.test_hl7_adapter import MAPPING, PLATELETS, oru
from trialwatch.adapters.hl7v2 import INTERNAL_ERROR, MLLP_END, MLLP_START
from trialwatch.adapters.mllp import MAX_MESSAGE_BYTES, Hl7Intake, start_listener

TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Case:
    kind: str  # "frames", "partial" or "oversize"
    chunks: tuple[bytes, ...]
    # Whether a record number in a log record is a leak (as in the hl7 surface).
    check_leaks: bool = True


def generate(rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.85:
        frames = [_frame(rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        data = b"".join(frame for frame, _ in frames)
        return Case("frames", _split(rng, data), all(leaks for _, leaks in frames))
    if roll < 0.95:
        frame, leaks = _frame(rng)
        return Case("partial", (frame[: rng.randrange(len(frame) - len(MLLP_END) + 1)],), leaks)
    header = oru(PLATELETS, control=f"BIG{rng.getrandbits(32)}").split("\r")[0].encode() + b"\r"
    head = MLLP_START + (header if rng.random() < 0.7 else b"")
    body = rng.choice((b"x", b"OBX|1|", b"|", b"\x0b")) * (MAX_MESSAGE_BYTES + rng.randint(1, 300_000))
    return Case("oversize", (head + body[: MAX_MESSAGE_BYTES + rng.randint(1, 300_000)] + MLLP_END,))


def _frame(rng: random.Random) -> tuple[bytes, bool]:
    """One frame: a mutated message (a fresh MSH-10, so the listener's memory of re-sends does not answer it)."""
    case = hl7_surface.generate(rng)
    control = f"F{rng.getrandbits(48):x}"
    head, rest = case.text[:200], case.text[200:]  # MSH-10 is near the start, and a message may be 1 MiB
    for seed in ("MSG0001", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9"):
        head = head.replace(f"|{seed}|P|", f"|{control}|P|", 1)
    payload = (head + rest).encode("utf-8", rng.choice(("surrogateescape", "replace")))
    if payload.count(MLLP_END) > 20:
        # Thousands of empty frames are answered too (AR), but slowly for a fuzzer.
        payload = payload.replace(MLLP_END, b"\x1c")
    roll = rng.random()
    if roll < 0.1:
        payload = mutate_bytes(rng, payload)
    elif roll < 0.15:
        payload = payload.decode("utf-8", "replace").encode(rng.choice(("latin-1", "utf-16")), "replace")
    frame = (b"" if rng.random() < 0.03 else MLLP_START) + payload + MLLP_END
    if len(frame) > MAX_MESSAGE_BYTES:
        frame = frame[: MAX_MESSAGE_BYTES - 16] + MLLP_END
    return frame, case.check_leaks and roll >= 0.1


def _split(rng: random.Random, data: bytes) -> tuple[bytes, ...]:
    """The bytes as written by the sender: at once, or in pieces cut anywhere (inside the end block too)."""
    if rng.random() < 0.6 or len(data) < 2:
        return (data,)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    return tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))


@dataclass
class _SizeSink:
    sizes: list[int] = field(default_factory=list)

    async def publish(self, topic: str, value: BaseModel) -> None:
        self.sizes.append(len(value.model_dump_json(exclude_unset=True).encode()))


class _Quiet:
    """The intake's logger: prints nothing, counts the log lines that carry a record number."""

    leaked = 0

    def bind(self, **fields: Any) -> _Quiet:
        self._check(fields)
        return self

    def _check(self, fields: dict[str, Any]) -> None:
        if hl7_surface.RECORD_NUMBER in repr(fields):
            _Quiet.leaked += 1

    def info(self, event: str, **fields: Any) -> None:
        self._check(fields)

    warning = error = info


class _ListenerLog:
    """The listener module's own log lines (structlog, configured for the run): dropped, errors counted."""

    errors: list[str] = []  # noqa: RUF012 (one run at a time)

    @staticmethod
    def processor(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if method in ("error", "critical", "exception"):
            _ListenerLog.errors.append(repr(event)[:300])
        raise structlog.DropEvent


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: asyncio.Server
    sink: _SizeSink
    port: int
    conn: socket.socket | None = None


_RUNNING: list[_Listener] = []
_STRUCTLOG: list[dict[str, Any]] = []


def setup() -> None:
    _STRUCTLOG.append(structlog.get_config())
    structlog.configure(
        processors=[_ListenerLog.processor],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mllp-fuzz", daemon=True)
    thread.start()
    sink = _SizeSink()
    intake = Hl7Intake(MAPPING, sink, logger=_Quiet())
    server = asyncio.run_coroutine_threadsafe(start_listener(intake, "127.0.0.1", 0), loop).result(TIMEOUT_S)
    _RUNNING.append(_Listener(loop, thread, server, sink, server.sockets[0].getsockname()[1]))
    hl7_surface.LEAKS.start()


def teardown() -> None:
    hl7_surface.LEAKS.stop()
    running = _RUNNING.pop()
    if running.conn is not None:
        running.conn.close()

    async def stop() -> None:
        running.server.close()
        await running.server.wait_closed()
        # The connections' tasks end as their peers have gone; cancel only what is left.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), running.loop).result(TIMEOUT_S)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(TIMEOUT_S)
    running.loop.close()
    structlog.configure(**_STRUCTLOG.pop())


def check(case: Case) -> Outcome:
    running = _RUNNING[-1]
    published, leaked, errors = len(running.sink.sizes), _Quiet.leaked, len(_ListenerLog.errors)
    if case.kind == "frames":
        outcome = _frames(running, case.chunks)
    elif case.kind == "partial":
        outcome = _partial(running, case.chunks[0])
    else:
        outcome = _oversize(running, case.chunks[0])
    if case.check_leaks and _Quiet.leaked != leaked:
        raise AssertionError("a log record carries a record number")
    if len(_ListenerLog.errors) != errors:
        raise AssertionError(f"the listener logged an error: {_ListenerLog.errors[errors:]}")
    return Outcome(outcome.accepted, outcome.reason, outcome.output_sizes + tuple(running.sink.sizes[published:]))


def _frames(running: _Listener, chunks: tuple[bytes, ...]) -> Outcome:
    if running.conn is None:
        running.conn = _connect(running)
    conn, running.conn = running.conn, None  # put back only if the exchange completes
    try:
        for chunk in chunks:
            conn.sendall(chunk)
        acks = _read_acks(conn, b"".join(chunks).count(MLLP_END))
    except BaseException:
        conn.close()
        raise
    running.conn = conn
    return _judge(acks)


def _partial(running: _Listener, data: bytes) -> Outcome:
    """A frame cut short, then the sender closes its side: the listener answers what was complete and closes."""
    with _connect(running) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        acks = _read_acks(conn, data.count(MLLP_END), until_closed=True)
    if acks:
        return _judge(acks)
    return Outcome.refused("partial frame: closed without an ACK")


def _oversize(running: _Listener, data: bytes) -> Outcome:
    with _connect(running) as conn:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(data)  # the listener may close while it is sent when its MSH is unreadable
        readable = data[1:4] == b"MSH"
        acks = _read_acks(conn, 1 if readable else 0, until_closed=not readable)
        if readable:
            # The connection goes on after the AR.
            conn.sendall(MLLP_START + oru(PLATELETS, control="AFTER").encode() + MLLP_END)
            acks += _read_acks(conn, 1)
    if readable and (_code(acks[0])[0], _code(acks[1])[0]) != ("AR", "AA"):
        raise AssertionError(f"an oversize frame with a readable MSH was not answered AR, then served: {acks!r}")
    return Outcome.refused(f"oversize: {'AR' if readable else 'closed'}", *map(len, acks))


def _connect(running: _Listener) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _read_acks(conn: socket.socket, expected: int, until_closed: bool = False) -> list[bytes]:
    """Exactly `expected` ACK frames (and then the listener's close, if `until_closed`)."""
    buffer = b""
    while buffer.count(MLLP_END) < expected or until_closed:
        try:
            chunk = conn.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if buffer.count(MLLP_END) < expected:
                raise AssertionError(f"closed with {expected - buffer.count(MLLP_END)} of {expected} frames unanswered")
            break
        buffer += chunk
    acks = [block + MLLP_END for block in buffer.split(MLLP_END)[:-1]]
    if len(acks) != expected or buffer.split(MLLP_END)[-1]:
        raise AssertionError(f"{len(acks)} ACKs for {expected} frames: {buffer[:300]!r}")
    return acks


def _code(ack: bytes) -> tuple[str, str]:
    if not ack.startswith(MLLP_START):
        raise AssertionError(f"an ACK without a start block: {ack[:200]!r}")
    segments = ack[1 : -len(MLLP_END)].decode().split("\r")
    msa = [s for s in segments if s.startswith("MSA|")]
    if len(msa) != 1 or len(msa[0].split("|")) != 4:
        raise AssertionError(f"not one MSA segment of 4 fields: {ack[:300]!r}")
    _, code, _, reason = msa[0].split("|")
    if reason.startswith(INTERNAL_ERROR):
        raise AssertionError(f"the listener failed: {reason}")
    return code, reason


def _judge(acks: list[bytes]) -> Outcome:
    sizes = [len(ack) for ack in acks]
    refused = [(code, reason) for code, reason in map(_code, acks) if code != "AA"]
    if not refused:
        return Outcome.ok(*sizes)
    code, reason = refused[0]
    return Outcome.refused(f"{code} {hl7_surface.category(reason)}", *sizes)


SURFACE = Surface("mllp", generate, check, setup, teardown)
