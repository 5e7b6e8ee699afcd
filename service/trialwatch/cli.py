"""The `trialwatch` command: worker, topics, replay, publish, hl7, fhir, alerts, schemas."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pydantic import AwareDatetime, BaseModel, TypeAdapter, ValidationError

from trialwatch import __version__
from trialwatch.contract import ALERTS, ALERTS_MASKED, AlertMessage, mask
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file
from trialwatch.replay_parallel import replay_parallel
from trialwatch.settings import Settings

if TYPE_CHECKING:
    from trialwatch.adapters import EventSink
    from trialwatch.adapters.mapping import AdapterMapping

_AWARE = TypeAdapter(AwareDatetime)


def _as_of(text: str) -> datetime:
    try:
        return _AWARE.validate_python(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 date-time with an offset (e.g. 2025-03-16T00:00:00+08:00)"
        ) from exc


def _open(path: str) -> TextIO:
    return sys.stdin if path == "-" else Path(path).open(encoding="utf-8")


# Below this many lines a parallel replay costs more in start-up than it saves.
PARALLEL_REPLAY_MIN_LINES = 10_000


def cmd_replay(args: argparse.Namespace) -> int:
    protocol_file = args.protocol or Settings().protocol_file

    def make_engine() -> Engine:
        return Engine(load_protocol(protocol_file))

    def render(alert: AlertMessage) -> str | None:
        shown: BaseModel | None = mask(alert) if args.masked else alert
        return None if shown is None else shown.model_dump_json()

    with _open(args.file) as f:
        lines: Iterable[str] = f
        jobs = args.jobs or min(4, os.cpu_count() or 1)
        if jobs > 1:
            lines = f.readlines()
            auto = args.jobs is None and len(lines) < PARALLEL_REPLAY_MIN_LINES
            result = None if auto else replay_parallel(lines, make_engine, jobs, args.as_of, render)
            if result is not None:
                sys.stdout.writelines(text + "\n" for text in result[0])
                sys.stderr.writelines(text + "\n" for text in result[1])
                return 0
        _replay_sequential(lines, make_engine(), args.as_of, render)
    return 0


def _replay_sequential(
    lines: Iterable[str], engine: Engine, as_of: datetime | None, render: Callable[[AlertMessage], str | None]
) -> None:
    replay = Replay(engine)

    def emit(alerts: Sequence[AlertMessage]) -> None:
        for alert in alerts:
            if (text := render(alert)) is not None:
                sys.stdout.write(text + "\n")

    for line_no, item in read_event_file(lines):
        if isinstance(item, BadLine):
            print(f"line {line_no}: {item.reason}: {item.detail}", file=sys.stderr)
            continue
        emit(replay.apply(item))
        for error in replay.take_errors():
            print(f"line {line_no}: {error}", file=sys.stderr)
    emit(replay.finish(as_of))
    for error in replay.take_errors():
        print(f"as of the end: {error}", file=sys.stderr)


def cmd_worker(args: argparse.Namespace) -> int:
    from faust.worker import Worker

    from trialwatch.app import create_app
    from trialwatch.kafka_admin import ensure_topics
    from trialwatch.logs import configure_logging, stdlib_logging_config

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(ensure_topics(settings))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings)
    worker = Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        logging_config=stdlib_logging_config(settings.log_level, settings.log_format),
    )
    worker.execute_from_commandline()
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from trialwatch.kafka_admin import ensure_topics

    settings = Settings()
    created = asyncio.run(ensure_topics(settings))
    print(f"created: {', '.join(created) if created else 'none (all present)'}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from trialwatch.publisher import publish_file

    settings = Settings()
    with _open(args.file) as f:
        report = asyncio.run(publish_file(settings, f))
    for line_no, reason, detail in report.rejected:
        print(f"line {line_no}: {reason}: {detail}", file=sys.stderr)
    print(f"sent {report.sent}, rejected {len(report.rejected)}", file=sys.stderr)
    return 1 if report.rejected else 0


def _adapter_mapping(args: argparse.Namespace, settings: Settings) -> AdapterMapping | None:
    from trialwatch.adapters.mapping import MappingFileError, load_mapping

    path = args.mapping or settings.adapter_mapping
    if path is None:
        print("no mapping file: pass --mapping or set TRIALWATCH_ADAPTER_MAPPING", file=sys.stderr)
        return None
    try:
        return load_mapping(path)
    except MappingFileError as exc:
        print(str(exc), file=sys.stderr)
        return None


@contextlib.asynccontextmanager
async def _sink(settings: Settings, dry_run: bool) -> AsyncIterator[EventSink]:
    """Kafka through the validating publisher, or standard output as an event file (`--dry-run`)."""
    from trialwatch.adapters import EventFileSink
    from trialwatch.publisher import Publisher

    if dry_run:
        yield EventFileSink(sys.stdout)
        return
    async with Publisher(settings.bootstrap_list) as publisher:
        yield publisher


def cmd_hl7(args: argparse.Namespace) -> int:
    from trialwatch.logs import configure_logging

    settings = Settings()
    if (args.file is None) == (args.listen is None):
        print("give either FILE (or -) or --listen PORT", file=sys.stderr)
        return 2
    if args.idle_timeout <= 0 or args.max_connections < 1:
        print("--idle-timeout must be above 0 and --max-connections at least 1", file=sys.stderr)
        return 2
    mapping = _adapter_mapping(args, settings)
    if mapping is None:
        return 2
    if args.listen is not None:
        configure_logging(settings.log_level, settings.log_format)
        host = args.host or settings.mllp_host
        asyncio.run(
            _listen(settings, mapping, host, args.listen, args.dry_run, args.idle_timeout, args.max_connections)
        )
        return 0
    # Bytes, so that a message in another encoding is refused alone rather than ending the command.
    with contextlib.nullcontext(sys.stdin.buffer) if args.file == "-" else Path(args.file).open("rb") as f:
        text = f.read().decode(settings.hl7_encoding, errors="surrogateescape")
    return asyncio.run(_hl7_file(settings, mapping, text, args.dry_run))


def _is_text(message: str, encoding: str) -> bool:
    try:
        message.encode(encoding)
    except UnicodeEncodeError:  # bytes the file's decoding kept as lone surrogates
        return False
    return True


async def _hl7_file(settings: Settings, mapping: AdapterMapping, text: str, dry_run: bool) -> int:
    import logging

    import structlog

    from trialwatch.adapters.hl7v2 import split_messages
    from trialwatch.adapters.mllp import Hl7Intake

    # The report below is this command's output; the intake's own log lines
    # would repeat it, so only errors (a failed publish) are logged, to stderr.
    quiet = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
    )
    counts = {"AA": 0, "AE": 0, "AR": 0}
    async with _sink(settings, dry_run) as sink:
        intake = Hl7Intake(mapping, sink, logger=quiet)
        for number, message in enumerate(split_messages(text), start=1):
            if _is_text(message, settings.hl7_encoding):
                answer = await intake.handle(message)
            else:
                answer = intake.refuse(f"message is not {settings.hl7_encoding} text")
            counts[answer.ack_code] += 1
            print(
                f"message {number} (MSH-10 {answer.control_id or '?'}): {answer.ack_code} {answer.text}",
                file=sys.stderr,
            )
    print(f"accepted {counts['AA']}, errors (AE) {counts['AE']}, rejected (AR) {counts['AR']}", file=sys.stderr)
    return 0 if counts["AE"] == counts["AR"] == 0 else 1


async def _listen(
    settings: Settings,
    mapping: AdapterMapping,
    host: str,
    port: int,
    dry_run: bool,
    idle_timeout: float,
    max_connections: int,
) -> None:
    from trialwatch.adapters.mllp import Hl7Intake, start_listener

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with _sink(settings, dry_run) as sink:
        server = await start_listener(
            Hl7Intake(mapping, sink),
            host,
            port,
            settings.hl7_encoding,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
        await stop.wait()
        # Stop taking connections, then let the publisher flush on the way out.
        server.close()
        await server.wait_closed()


def cmd_fhir(args: argparse.Namespace) -> int:
    from trialwatch.adapters import topic_of
    from trialwatch.adapters.fhir_r4 import map_fhir

    settings = Settings()
    mapping = _adapter_mapping(args, settings)
    if mapping is None:
        return 2
    # Bytes: a line that is not UTF-8 is refused on its own, not the whole file.
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    outcomes = map_fhir(data, mapping)

    async def send() -> None:
        async with _sink(settings, args.dry_run) as sink:
            for outcome in outcomes:
                if outcome.event is not None:
                    await sink.publish(topic_of(outcome.event), outcome.event)

    asyncio.run(send())
    for outcome in outcomes:
        if outcome.event is not None:
            print(f"{outcome.where}: sent to {topic_of(outcome.event)}", file=sys.stderr)
        else:
            print(f"{outcome.where}: {'skipped' if outcome.skipped else 'rejected'}: {outcome.reason}", file=sys.stderr)
    sent = sum(o.event is not None for o in outcomes)
    rejected = sum(o.rejected for o in outcomes)
    print(f"sent {sent}, rejected {rejected}, skipped {len(outcomes) - sent - rejected}", file=sys.stderr)
    return 1 if rejected or not outcomes else 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from trialwatch.alert_feed import follow_alerts

    settings = Settings()
    topic = ALERTS_MASKED if args.masked else ALERTS
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow_alerts(settings, topic, as_json=args.json, idle_exit_s=args.idle_exit))
    return 0


def cmd_demo_cohort(args: argparse.Namespace) -> int:
    from trialwatch.demo import demo_cohort

    sys.stdout.write(demo_cohort(args.today))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from trialwatch.cohort import write

    until = None
    if args.until is not None:
        until = datetime.now(UTC) if args.until == "now" else datetime.fromisoformat(args.until)
        if until.tzinfo is None:
            print("--until needs a UTC offset (or 'now')", file=sys.stderr)
            return 2
    sys.stdout.writelines(write(args.subjects, args.seed, args.start, until))
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from trialwatch.schemas import SCHEMA_DIR, check_schemas, write_schemas

    if args.check:
        drift = check_schemas(SCHEMA_DIR)
        for name in drift:
            print(f"out of date: schemas/{name}", file=sys.stderr)
        if drift:
            print("run `trialwatch schemas` and commit the result", file=sys.stderr)
        return 1 if drift else 0
    for name in write_schemas(SCHEMA_DIR):
        print(f"wrote schemas/{name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trialwatch", description="Safety monitor for trial NCT06592612.")
    parser.add_argument("--version", action="version", version=f"trialwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run the streaming worker (HTTP: /health, /metrics)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("topics", help="create the contract's topics (idempotent)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("replay", help="run the rule engine over an event file and print its alert messages")
    p.add_argument("file", help="event file, one {topic, value} JSON object per line; - for stdin")
    p.add_argument("--as-of", type=_as_of, help="advance the event-time clock to this time at the end")
    p.add_argument("--masked", action="store_true", help="print the masked (blinded) stream")
    p.add_argument("--protocol", type=Path, help="protocol file (default: seeds/protocol-v1.toml)")
    p.add_argument(
        "--jobs",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="processes, subjects split between them, same output (default: the CPUs, up to 4, "
        f"for files of {PARALLEL_REPLAY_MIN_LINES:,} lines or more)",
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("publish", help="validate an event file and send its valid lines to Kafka")
    p.add_argument("file", help="event file; - for stdin")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("hl7", help="map HL7 v2 ORU^R01 lab results to events: from a file, or as an MLLP listener")
    p.add_argument("file", nargs="?", help="messages separated by blank lines or MLLP-framed; - for stdin")
    p.add_argument("--listen", type=int, metavar="PORT", help="run an MLLP listener on this port instead")
    p.add_argument("--host", help="address to listen on (default: TRIALWATCH_MLLP_HOST, 127.0.0.1)")
    # Defaults as in trialwatch.adapters.mllp (not imported here: every command would load python-hl7).
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close a connection that sends no complete message for this long (default 60)",
    )
    p.add_argument(
        "--max-connections", type=int, default=64, metavar="N", help="connections served at once; more are closed"
    )
    p.add_argument("--mapping", type=Path, help="adapter mapping file (default: TRIALWATCH_ADAPTER_MAPPING)")
    p.add_argument("--dry-run", action="store_true", help="print the events as an event file instead of sending")
    p.set_defaults(func=cmd_hl7)

    p = sub.add_parser("fhir", help="map FHIR R4 Observation and AdverseEvent resources (or Bundles, NDJSON)")
    p.add_argument("file", help="a resource, a Bundle, or NDJSON; - for stdin")
    p.add_argument("--mapping", type=Path, help="adapter mapping file (default: TRIALWATCH_ADAPTER_MAPPING)")
    p.add_argument("--dry-run", action="store_true", help="print the events as an event file instead of sending")
    p.set_defaults(func=cmd_fhir)

    p = sub.add_parser("alerts", help="follow the alert stream and print it for people")
    p.add_argument("--masked", action="store_true", help="follow the masked stream")
    p.add_argument("--json", action="store_true", help="print the raw alert messages")
    p.add_argument("--idle-exit", type=float, default=None, help="stop after this many idle seconds")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("demo-cohort", help="print the synthetic demo cohort, dated relative to today")
    p.add_argument("--today", type=date.fromisoformat, help="place the cohort as if today were this date")
    p.set_defaults(func=cmd_demo_cohort)

    p = sub.add_parser("seed", help="write a deterministic synthetic cohort as an event file")
    p.add_argument("--subjects", type=int, default=70, help="number of subjects (the trial plans 70)")
    p.add_argument("--seed", type=int, default=1, help="same seed, same file")
    p.add_argument("--start", type=date.fromisoformat, default=date(2025, 1, 6), help="first enrolment date")
    p.add_argument("--until", help="leave out events after this date-time (with offset) or 'now': the cohort so far")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("schemas", help="write JSON Schema and AsyncAPI files from the models")
    p.add_argument("--check", action="store_true", help="fail when the checked-in files differ")
    p.set_defaults(func=cmd_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        # `trialwatch seed | head`: the reader has gone; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
