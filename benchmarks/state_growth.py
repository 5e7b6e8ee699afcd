"""Per-event cost, subject-state size and recovery time as subjects' histories grow: the yardstick of issue 11.

Prints figures; asserts nothing. Run: `make bench-state` (a broker of its own for the recovery through a
worker) or `.venv/bin/python benchmarks/state_growth.py` (in-process figures only, unless
KAFKA_BOOTSTRAP_SERVERS names a broker).

1. Growth, in-process: one subject, enrolled and on second-line therapy, then N events at 12-hour steps:
   90 % lab results over eleven analytes, 10 % adverse events (half new AEs, half their later update to
   grade 1: an AE never updated stays an open alert, which the state keeps, about 230 bytes each). At each
   N: the state record's size, and the median cost of the next event applied to the live state (engine
   warm), through the worker shell (decode, engine, serialise, save) and after a rebalance (the state
   parsed from its record first).
2. Recovery of a partition of --recovery-subjects subjects with --recovery-events events each (one state
   at that N, cloned per subject). In-process: reading every record's header (what the subjects table's
   on_changelog_event does while recovering) and decoding every full state (what the first event of each
   subject pays after recovery). Through a broker: the records produced to partition 0 of a fresh app
   id's subjects changelog, then a `trialwatch worker` of that app id timed from process start to
   /health saying it consumes (tables recovered, partitions assigned), against a worker of another
   fresh app id with an empty changelog; with each worker's resident memory once ready.
3. The replay rate of the 1,000-subject `trialwatch seed` cohort through the `trialwatch replay` command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry
from throughput import start_worker, wait_consuming

from trialwatch.cohort import generate
from trialwatch.contract import ADVERSE_EVENTS, ENROLLMENT, LABS, TREATMENT
from trialwatch.decode import decode
from trialwatch.engine import Engine, SubjectState
from trialwatch.engine.state import decode_header, decode_state, encode_state
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
from trialwatch.settings import Settings
from trialwatch.worker import Record, SubjectWorker

SUBJECT = "TW-BENCH"
START = datetime(2025, 1, 1, 8, 0, tzinfo=UTC)
ANALYTES = [
    ("platelets", "10*9/L", 180.0),
    ("neutrophils", "10*9/L", 3.2),
    ("wbc", "10*9/L", 6.0),
    ("hemoglobin", "g/L", 130.0),
    ("total_bilirubin", "umol/L", 12.0),
    ("alt", "U/L", 30.0),
    ("ast", "U/L", 28.0),
    ("alp", "U/L", 90.0),
    ("albumin", "g/L", 42.0),
    ("creatinine", "umol/L", 70.0),
    ("inr", "{INR}", 1.0),
]
SAMPLE = 20


def _common(event_id: str, at: datetime) -> dict[str, Any]:
    return {"event_id": event_id, "subject_id": SUBJECT, "site_id": "SITE-GZ", "occurred_at": at.isoformat()}


def history() -> Iterator[tuple[str, bytes]]:
    """(topic, value) of one subject's records, without end."""
    yield (
        ENROLLMENT,
        json.dumps(
            {
                **_common("en", START),
                "arm": "control",
                "first_line_regimen": "lenvatinib",
                "age_years": 60,
                "kps": 90,
                "child_pugh_score": 6,
            }
        ).encode(),
    )
    yield (
        TREATMENT,
        json.dumps(
            {**_common("tx", START + timedelta(days=1)), "kind": "second_line_start", "regimen": "regorafenib+pd1"}
        ).encode(),
    )
    i = 0
    while True:
        at = START + timedelta(days=2, hours=12 * i)
        if i % 10 == 9:
            # Adverse events as sites report them: a new AE (grade 1 to 3),
            # then, ten records on, its update (resolved to grade 1).
            k, update = divmod(i // 10, 2)
            body = {
                **_common(f"ae-{i}", at),
                "ae_id": f"AE-{k}",
                "term": "Fatigue",
                "grade": 1 if update else 1 + k % 3,
                "serious": False,
                "attribution": "possible",
            }
            yield ADVERSE_EVENTS, json.dumps(body).encode()
        else:
            analyte, unit, normal = ANALYTES[i % len(ANALYTES)]
            wobble = 1.0 + ((i * 37) % 21 - 10) / 100
            body = {**_common(f"lab-{i}", at), "analyte": analyte, "value": round(normal * wobble, 2), "unit": unit}
            yield LABS, json.dumps(body).encode()
        i += 1


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


class Growth:
    """One subject's state grown event by event, measured at the checkpoints."""

    def __init__(self) -> None:
        self.engine = Engine(load_protocol())
        self.records = history()
        self.state: SubjectState | None = None
        self.applied = 0

    def _next_event(self) -> Any:
        topic, value = next(self.records)
        return topic, value, decode(topic, value)

    def grow_to(self, n: int, deadline: float) -> bool:
        while self.applied < n:
            if time.monotonic() > deadline:
                return False
            _, _, event = self._next_event()
            self.state, _ = self.engine.apply(self.state, event, event.occurred_at)
            self.applied += 1
        return True

    def measure(self) -> dict[str, float]:
        """Size and costs at the current N; the sampled events are applied (N grows by 3 x SAMPLE)."""
        assert self.state is not None
        size = len(self.state.to_bytes())
        warm, cold, shell = [], [], []
        for _ in range(SAMPLE):
            _, _, event = self._next_event()
            started = time.perf_counter()
            self.state, _ = self.engine.apply(self.state, event, event.occurred_at)
            warm.append(time.perf_counter() - started)
        for _ in range(SAMPLE):
            raw = self.state.to_bytes()
            _, _, event = self._next_event()
            started = time.perf_counter()
            state = SubjectState.from_bytes(raw)
            self.state, _ = self.engine.apply(state, event, event.occurred_at)
            self.state.to_bytes()
            cold.append(time.perf_counter() - started)
        shell = asyncio.run(self._through_the_worker())
        self.applied += 3 * SAMPLE
        return {"bytes": size, "warm": _median_ms(warm), "cold": _median_ms(cold), "shell": _median_ms(shell)}

    async def _through_the_worker(self) -> list[float]:
        assert self.state is not None
        worker = SubjectWorker(self.engine, Metrics(CollectorRegistry()), _sink)
        states = {SUBJECT.encode(): self.state.to_bytes()}
        out = []
        for offset in range(SAMPLE):
            topic, value, _ = self._next_event()
            started = time.perf_counter()
            await worker.handle(Record(topic, 0, offset, SUBJECT.encode(), value), states)
            out.append(time.perf_counter() - started)
        self.state = SubjectState.from_bytes(states[SUBJECT.encode()])
        return out


async def _sink(topic: str, key: bytes, value: bytes) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def replay_rate(subjects: int, runs: int = 3) -> tuple[int, list[float]]:
    """Seconds of `trialwatch replay` over the seed cohort, per run, jobs as the command chooses and with --jobs 1.

    Several runs: on a shared machine one run can be 30 % off the next.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cohort.jsonl"
        lines = [json.dumps(x) for x in generate(subjects, seed=1, start=date(2025, 1, 1))]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        command = [str(Path(sys.executable).with_name("trialwatch")), "replay", str(path)]
        seconds = []
        for options in [[]] * runs + [["--jobs", "1"]]:
            started = time.perf_counter()
            subprocess.run(command + options, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
        return len(lines), seconds


def recovery_records(subjects: int, events: int, deadline: float) -> list[tuple[bytes, bytes]] | None:
    """(key, value) of `subjects` changelog records: one subject's state after `events` events, cloned."""
    growth = Growth()
    if not growth.grow_to(events, deadline):
        return None
    state = growth.state
    assert state is not None
    records = []
    for i in range(subjects):
        state.subject_id, state.site_id = f"TW-R{i:05d}", f"SITE-{i % 20:02d}"
        records.append((state.subject_id.encode(), encode_state(state)))
    return records


def _best_of(rounds: int, run: Any) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def recovery_in_process(records: list[tuple[bytes, bytes]]) -> tuple[float, float]:
    """Seconds to read every record's header, and to decode every full state (best of 3 each)."""
    values = [value for _, value in records]

    def every(decode: Any) -> None:
        # One at a time, none kept: as the worker decodes a state per event.
        # (Keeping 1,000 decoded states alive costs ~8x more, in the cyclic GC.)
        for value in values:
            decode(value)

    return _best_of(3, lambda: every(decode_header)), _best_of(3, lambda: every(decode_state))


async def fill_changelog(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], settings: Settings) -> float:
    """Create the subjects changelog as Faust would (compacted) and produce every record to partition 0."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        spec = NewTopic(
            topic, settings.partitions, settings.replication_factor, topic_configs={"cleanup.policy": "compact"}
        )
        await admin.create_topics([spec])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        sent = [await producer.send(topic, value, key=key, partition=0) for key, value in records]
        await asyncio.gather(*sent)
        return time.perf_counter() - started
    finally:
        await producer.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# Faust's log lines (info, by their start) that split a worker's start-up into phases.
PHASES = {
    "[^Worker]: Starting...": "worker",
    "[^---Recovery]: active offsets at start of reading": "reading",
    "[^---Recovery]: Recovery complete": "recovered",
}


@dataclass
class StartUp:
    ready_s: float
    rss_mb: float
    # Seconds from process start to each of PHASES, from the worker's log (missing if not logged).
    marks: dict[str, float]

    def phases(self) -> str:
        m = self.marks
        if len(m) < len(PHASES):
            return "(phases not in the worker log)"
        return (
            f"imports and topic set-up {m['worker']:.1f} s, group join {m['reading'] - m['worker']:.1f} s, "
            f"changelog read {m['recovered'] - m['reading']:.1f} s, then to ready {self.ready_s - m['recovered']:.1f} s"
        )


def _marks(log: Path, started_at: float) -> dict[str, float]:
    marks: dict[str, float] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            event = entry["event"]
            phase = next((name for start, name in PHASES.items() if event.startswith(start)), None)
            if phase is not None and phase not in marks:
                marks[phase] = datetime.fromisoformat(entry["timestamp"]).timestamp() - started_at
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return marks


def start_to_ready(bootstrap: str, app_id: str, workdir: Path) -> StartUp:
    """A `trialwatch worker` of `app_id` from process start to its /health saying it consumes; its RSS then."""
    workdir.mkdir()
    port = _free_port()
    started, started_at = time.perf_counter(), time.time()
    proc = start_worker(bootstrap, workdir, app_id, port, log_level="info")
    try:
        wait_consuming(proc, port, workdir)
        ready_s, rss = time.perf_counter() - started, _rss_mb(proc.pid)
    except RuntimeError:
        # The log goes with the temporary directory: show its end first.
        sys.stderr.writelines((workdir / "worker.log").read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return StartUp(ready_s, rss, _marks(workdir / "worker.log", started_at))


def recovery(args: argparse.Namespace, deadline: float) -> None:
    subjects, events = args.recovery_subjects, args.recovery_events
    records = recovery_records(subjects, events, deadline)
    if records is None:
        print(f"recovery: a state at N = {events:,} not reached in the {args.budget_s:.0f} s budget")
        return
    size = sum(len(value) for _, value in records)
    print(
        f"recovery of one partition: {subjects:,} subjects x {events:,} events, "
        f"{size / 1e6:,.1f} MB of state records ({size / subjects / 1000:,.1f} kB each)"
    )
    headers_s, states_s = recovery_in_process(records)
    print(
        f"  in-process, every record's header (on_changelog_event): {headers_s * 1000:8.1f} ms "
        f"= {headers_s / subjects * 1e6:7.1f} µs per record"
    )
    print(
        f"  in-process, every full state (first event after):       {states_s * 1000:8.1f} ms "
        f"= {states_s / subjects * 1e6:7.1f} µs per record"
    )
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print(
            "  through a worker: skipped (no broker); run `make bench-state`, or set KAFKA_BOOTSTRAP_SERVERS=host:port"
        )
        return
    settings = Settings(bootstrap_servers=bootstrap)
    run = uuid.uuid4().hex[:8]
    full, empty = f"bench-recovery-{run}", f"bench-empty-{run}"
    topic = f"{full}-subjects-changelog"
    produced_s = asyncio.run(fill_changelog(bootstrap, topic, records, settings))
    print(f"  produced to {topic} partition 0 of {settings.partitions}: {produced_s:.1f} s")
    # The first start of a worker reads faust & co. from a cold disk cache: not the empty worker's own cost.
    subprocess.run([sys.executable, "-c", "import trialwatch.app"], check=True)
    with tempfile.TemporaryDirectory(prefix="trialwatch-bench-state-") as tmp:
        empty_up = start_to_ready(bootstrap, empty, Path(tmp) / "empty")
        print(f"  worker, empty changelog: start to ready {empty_up.ready_s:5.1f} s, RSS {empty_up.rss_mb:4.0f} MB")
        print(f"    {empty_up.phases()}", flush=True)
        full_up = start_to_ready(bootstrap, full, Path(tmp) / "full")
        print(
            f"  worker, {subjects:,} subjects:  start to ready {full_up.ready_s:5.1f} s, RSS {full_up.rss_mb:4.0f} MB"
        )
        print(f"    {full_up.phases()}")
    read_s = full_up.marks.get("recovered", math.nan) - full_up.marks.get("reading", math.nan)
    print(
        f"  the recovery's own cost (issue 11: under 10 s): {full_up.ready_s - empty_up.ready_s:+.1f} s start to "
        f"ready (start-ups vary by ±0.5 s), {read_s:.1f} s changelog read; "
        f"{full_up.rss_mb - empty_up.rss_mb:+.0f} MB resident"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="state_growth.py")
    parser.add_argument("--events", default="10,100,1000,5000,20000", help="checkpoints of prior events N")
    parser.add_argument("--budget-s", type=float, default=600.0, help="stop growing the history after this long")
    parser.add_argument("--replay-subjects", type=int, default=1000)
    parser.add_argument("--recovery-subjects", type=int, default=1000, help="subjects in the recovered partition")
    parser.add_argument("--recovery-events", type=int, default=2000, help="prior events of each recovered subject")
    args = parser.parse_args()
    # The worker logs every alert it produces: not what this prints.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    # Nor aiokafka's retries while a topic just created gets its leader.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    checkpoints = [int(n) for n in args.events.split(",")]
    growth = Growth()
    deadline = time.monotonic() + args.budget_s
    print(
        f"{'prior events N':>15} {'state record':>14} {'engine warm':>12} {'worker shell':>13} {'after rebalance':>16}"
    )
    for n in checkpoints:
        if not growth.grow_to(n, deadline):
            print(f"{n:>15,} not reached: {growth.applied:,} events in the {args.budget_s:.0f} s budget")
            break
        m = growth.measure()
        print(
            f"{n:>15,} {m['bytes'] / 1000:>11,.1f} kB {m['warm']:>9.2f} ms {m['shell']:>10.2f} ms "
            f"{m['cold']:>13.2f} ms",
            flush=True,
        )
    recovery(args, time.monotonic() + args.budget_s)
    events, seconds = replay_rate(args.replay_subjects)
    *runs, one_process = seconds
    rates = ", ".join(f"{events / s:,.0f}" for s in runs)
    median = events / statistics.median(runs)
    print(
        f"trialwatch replay, {args.replay_subjects:,}-subject seed cohort ({events:,} events, start-up included): "
        f"{rates} events/s in {len(runs)} runs on {os.cpu_count()} CPUs (median {median:,.0f}); "
        f"--jobs 1: {events / one_process:,.0f} events/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
