"""The `trialwatch` command: worker, topics, replay, publish, alerts, schemas."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TextIO

from pydantic import AwareDatetime, BaseModel, TypeAdapter, ValidationError

from trialwatch import __version__
from trialwatch.contract import ALERTS, ALERTS_MASKED, AlertMessage, mask
from trialwatch.engine import Engine
from trialwatch.protocol import load_protocol
from trialwatch.replay import BadLine, Replay, read_event_file
from trialwatch.settings import Settings

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


def cmd_replay(args: argparse.Namespace) -> int:
    settings = Settings()
    engine = Engine(load_protocol(args.protocol or settings.protocol_file))
    replay = Replay(engine)
    bad = 0
    out = sys.stdout

    def emit(alerts: Sequence[AlertMessage]) -> None:
        for alert in alerts:
            shown: BaseModel | None = mask(alert) if args.masked else alert
            if shown is not None:
                out.write(shown.model_dump_json() + "\n")

    with _open(args.file) as f:
        for line_no, item in read_event_file(f):
            if isinstance(item, BadLine):
                bad += 1
                print(f"line {line_no}: {item.reason}: {item.detail}", file=sys.stderr)
                continue
            emit(replay.apply(item))
    emit(replay.finish(args.as_of))
    return 0


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

    sys.stdout.writelines(write(args.subjects, args.seed, args.start))
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
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("publish", help="validate an event file and send its valid lines to Kafka")
    p.add_argument("file", help="event file; - for stdin")
    p.set_defaults(func=cmd_publish)

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
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("schemas", help="write JSON Schema and AsyncAPI files from the models")
    p.add_argument("--check", action="store_true", help="fail when the checked-in files differ")
    p.set_defaults(func=cmd_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
