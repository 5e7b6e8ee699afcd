"""Per-event cost and subject-state size as one subject's history grows: the yardstick of issue 11.

In-process, no broker. One subject, enrolled and on second-line therapy, then
N events at 12-hour steps: 90 % lab results over eleven analytes, 10 % adverse
events (half new AEs, half their later update to grade 1: an AE never updated
stays an open alert, which the state keeps, about 230 bytes each). At each N
it prints the state record's size, the cost of the next events applied to the live state (warm), through the worker shell (decode,
engine, serialise, save) and after a rebalance (the state parsed from its
record first), and the replay rate of the 1,000-subject `trialwatch seed`
cohort through the `trialwatch replay` command. Prints figures; asserts
nothing. Run: `make bench-state` or `.venv/bin/python benchmarks/state_growth.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from trialwatch.cohort import generate
from trialwatch.contract import ADVERSE_EVENTS, ENROLLMENT, LABS, TREATMENT
from trialwatch.decode import decode
from trialwatch.engine import Engine, SubjectState
from trialwatch.metrics import Metrics
from trialwatch.protocol import load_protocol
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


def replay_rate(subjects: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cohort.jsonl"
        lines = [json.dumps(x) for x in generate(subjects, seed=1, start=date(2025, 1, 1))]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        command = [str(Path(sys.executable).with_name("trialwatch")), "replay", str(path)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return len(lines), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="state_growth.py")
    parser.add_argument("--events", default="10,100,1000,5000,20000", help="checkpoints of prior events N")
    parser.add_argument("--budget-s", type=float, default=600.0, help="stop growing the history after this long")
    parser.add_argument("--replay-subjects", type=int, default=1000)
    args = parser.parse_args()
    # The worker logs every alert it produces: not what this prints.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
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
    events, seconds = replay_rate(args.replay_subjects)
    print(
        f"trialwatch replay, {args.replay_subjects:,}-subject seed cohort: {events:,} events in {seconds:.1f} s "
        f"= {events / seconds:,.0f} events/s (start-up included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
