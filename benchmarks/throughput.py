"""Throughput and latency of the live worker against the ceiling of a raw aiokafka consume->produce loop.

Run with `make bench` (a fresh broker of its own) or, against a broker you
run, `KAFKA_BOOTSTRAP_SERVERS=host:port .venv/bin/python benchmarks/throughput.py`.
Prints figures; asserts nothing (timings belong here, not in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import date
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from trialwatch.cohort import generate
from trialwatch.contract import INPUT_TOPICS
from trialwatch.kafka_admin import ensure_topics
from trialwatch.publisher import publish_file
from trialwatch.settings import Settings

TRIALWATCH = str(Path(sys.executable).with_name("trialwatch"))


async def publish(bootstrap: str, lines: list[dict[str, object]]) -> float:
    """As `trialwatch publish` sends a file: validated, all sent, then every acknowledgement awaited."""
    text = [json.dumps(line) for line in lines]
    started = time.perf_counter()
    report = await publish_file(Settings(bootstrap_servers=bootstrap), text)
    if report.rejected or report.sent != len(lines):
        raise RuntimeError(f"the generated cohort did not publish cleanly: {report}")
    return time.perf_counter() - started


async def raw_loop(bootstrap: str, total: int) -> float:
    """The ceiling: consume every input record, decode its JSON once, produce one record per input, in batches."""
    group = f"bench-raw-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        *INPUT_TOPICS,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        seen = 0
        started: float | None = None
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if started is None and batch:
                started = time.perf_counter()
            futures = []
            for records in batch.values():
                for rec in records:
                    value = json.loads(rec.value or b"{}")
                    out = json.dumps({"event_id": value.get("event_id"), "ok": True}).encode()
                    futures.append(await producer.send("bench-raw-out", out, key=rec.key))
                    seen += 1
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
        return time.perf_counter() - (started or time.perf_counter())
    finally:
        await consumer.stop()
        await producer.stop()


async def committed_all(bootstrap: str, group: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in INPUT_TOPICS for p in (consumer.partitions_for_topic(t) or ())]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(t, p) for t in INPUT_TOPICS for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(tps)
        done = await admin.list_consumer_group_offsets(group, partitions=tps)
        return all(ends[tp] == 0 or (done.get(tp) is not None and done[tp].offset >= ends[tp]) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


def start_worker(
    bootstrap: str, workdir: Path, app_id: str, port: int, log_level: str = "warning"
) -> subprocess.Popen[bytes]:
    """A `trialwatch worker` process of group `app_id`, its data and its log (worker.log) in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TRIALWATCH_APP_ID": app_id,
        "TRIALWATCH_WEB_PORT": str(port),
        "TRIALWATCH_DATA_DIR": str(workdir / "data"),
        "TRIALWATCH_LOG_LEVEL": log_level,
    }
    with (workdir / "worker.log").open("wb") as log:
        return subprocess.Popen([TRIALWATCH, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_consuming(proc: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
    """Until the worker's /health says it consumes: tables recovered and partitions assigned."""
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: see {workdir / 'worker.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read()).get("consuming"):
                    return
        except OSError:
            pass
        time.sleep(0.2)


def faust_ceiling(bootstrap: str, total: int) -> float:
    """Seconds Faust's own delivery path takes to hand `total` input records to an agent that does nothing."""
    script = Path(__file__).with_name("faust_ceiling.py")
    with tempfile.TemporaryDirectory(prefix="trialwatch-bench-faust-") as tmp:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TOTAL": str(total)}
        cmd = [sys.executable, str(script), "worker", "-l", "warn", "--without-web"]
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    # Faust's worker turns prints into log lines on stderr.
    found = re.search(r"faust-ceiling (\d+) ([0-9.]+)", done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"faust_ceiling.py printed no figure:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(found.group(2))


def total_records(bootstrap: str) -> int:
    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(t, p) for t in INPUT_TOPICS for p in (consumer.partitions_for_topic(t) or ())]
            starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
            return sum(ends[tp] - starts[tp] for tp in tps)
        finally:
            await consumer.stop()

    return asyncio.run(count())


def until_committed(bootstrap: str, app_id: str, procs: list[subprocess.Popen[bytes]], workdir: Path) -> float:
    """Seconds until group `app_id` has committed every input record (counted from now)."""
    started = time.perf_counter()
    while not asyncio.run(committed_all(bootstrap, app_id)):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker exited: see {workdir}")
        time.sleep(0.5)
    return time.perf_counter() - started


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def renamed(lines: list[dict[str, object]], tag: str) -> list[dict[str, object]]:
    """The cohort under other subject codes (and ids), so its events are new to a worker that saw the original."""
    return [json.loads(json.dumps(line).replace('"TWS-', f'"TW{tag}-')) for line in lines]


async def offered_load(bootstrap: str, rate: int, seconds: float, background: list[dict[str, object]]) -> str:
    """Event-to-alert latency of probe events sent among background events at `rate` events/s in total.

    A probe is a critically low platelet count of a new subject: it raises an
    alert at once. Latency: from just before the probe is sent to the moment
    its alert is read from trial.alerts.v1 (one clock, this process).
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1)
    alerts = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await producer.start()
    await alerts.start()
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    try:
        await alerts._client.force_metadata_update()
        alerts.assign(
            [TopicPartition("trial.alerts.v1", p) for p in alerts.partitions_for_topic("trial.alerts.v1") or ()]
        )
        await alerts.seek_to_end()
        tag = uuid.uuid4().hex[:6]
        probes_per_s, step_s = 20, 0.01
        per_step = max(0.0, (rate - probes_per_s) * step_s)
        source = iter(background)
        owed, sent, probes = 0.0, 0, 0
        started = time.perf_counter()
        reader = asyncio.create_task(_read_probe_alerts(alerts, sent_at, latencies))
        while (elapsed := time.perf_counter() - started) < seconds:
            owed += per_step
            while owed >= 1:
                line = next(source)
                value = line["value"]
                assert isinstance(value, dict)
                await producer.send(
                    str(line["topic"]), json.dumps(value).encode(), key=str(value["subject_id"]).encode()
                )
                owed -= 1
                sent += 1
            if probes < elapsed * probes_per_s:
                subject = f"PROBE-{tag}-{probes:05d}"
                probe = {
                    "event_id": f"{subject}-1",
                    "subject_id": subject,
                    "site_id": "SITE-FS",
                    "occurred_at": "2025-06-02T08:00:00+08:00",
                    "analyte": "platelets",
                    "value": 20.0,
                    "unit": "10*9/L",
                }
                sent_at[subject] = time.time()
                await producer.send("trial.labs.v1", json.dumps(probe).encode(), key=subject.encode())
                probes += 1
            await asyncio.sleep(max(0.0, started + (elapsed // step_s + 1) * step_s - time.perf_counter()))
        await producer.flush()
        offered = (sent + probes) / (time.perf_counter() - started)
        deadline = time.monotonic() + 60
        while len(latencies) < probes and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        reader.cancel()
    finally:
        await producer.stop()
        await alerts.stop()
    return _latency_line(rate, offered, probes, latencies)


async def _read_probe_alerts(alerts: AIOKafkaConsumer, sent_at: dict[str, float], latencies: list[float]) -> None:
    while True:
        batch = await alerts.getmany(timeout_ms=100)
        now = time.time()
        for records in batch.values():
            for rec in records:
                subject = json.loads(rec.value or b"{}").get("subject_id")
                if subject in sent_at:
                    latencies.append(now - sent_at.pop(subject))


def _latency_line(rate: int, offered: float, probes: int, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    if not ordered:
        return f"  offered {rate:>5,}/s (sent {offered:7,.0f}/s): no probe alert within 60 s: not sustained"
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    # A worker that keeps up answers the last probes as fast as the first ones.
    sustained = len(ordered) == probes and p99 < 1.0
    mark = "" if sustained else "   <- not sustained: the worker fell behind"
    return (
        f"  offered {rate:>5,}/s (sent {offered:7,.0f}/s): p50 {1000 * p50:7.1f} ms  p99 {1000 * p99:7.1f} ms"
        f"  ({len(ordered)}/{probes} probes){mark}"
    )


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)
    return float(found.group(1)) if found else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--load-seconds", type=float, default=10.0, help="length of each offered-load phase")
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("set KAFKA_BOOTSTRAP_SERVERS or run `make bench`", file=sys.stderr)
        return 2

    lines = list(generate(args.subjects, args.seed, date(2025, 1, 6)))
    asyncio.run(ensure_topics(Settings(bootstrap_servers=bootstrap)))
    print(f"cohort: {args.subjects} subjects, seed {args.seed}: {len(lines):,} events", flush=True)
    published_s = asyncio.run(publish(bootstrap, lines))
    print(f"trialwatch publish (validated):          {published_s:6.2f} s  {len(lines) / published_s:9,.0f} events/s")
    # All input topics hold only this cohort on a fresh broker; on a shared one
    # the loops below process everything there (the figures stay per record).
    raw_s = asyncio.run(raw_loop(bootstrap, len(lines)))
    print(f"raw aiokafka consume->decode->produce:    {raw_s:6.2f} s  {len(lines) / raw_s:9,.0f} events/s", flush=True)
    faust_s = faust_ceiling(bootstrap, len(lines))
    print(
        f"Faust agent, take and ack only:           {faust_s:6.2f} s  {len(lines) / faust_s:9,.0f} events/s", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="trialwatch-bench-") as tmp:
        workdir = Path(tmp)
        port = 16900 + os.getpid() % 100
        app_id = f"bench-{uuid.uuid4().hex[:8]}"
        proc = start_worker(bootstrap, workdir, app_id, port)
        try:
            wait_consuming(proc, port, workdir)
            worker_s = until_committed(bootstrap, app_id, [proc], workdir)
            metrics = scrape(port)
            count = metric(metrics, "trialwatch_event_processing_duration_seconds_count")
            inside = metric(metrics, "trialwatch_event_processing_duration_seconds_sum")
            batches = metric(metrics, "trialwatch_batch_records_count")
            print(f"trialwatch worker (1 process):            {worker_s:6.2f} s  {count / worker_s:9,.0f} events/s")
            print(
                f"  computing (decode, rules, outputs): {inside:.2f} s, {1000 * inside / count:.3f} ms per event;"
                f" {count / batches:,.0f} records per batch"
            )
            print(f"  worker / raw ceiling: {raw_s / worker_s:.0%}", flush=True)
            print("event -> alert latency, 1 worker caught up, probes among background events:")
            for n, rate in enumerate((200, 1000, 5000)):
                background = renamed(lines, f"L{n}")
                print(asyncio.run(offered_load(bootstrap, rate, args.load_seconds, background)), flush=True)
                until_committed(bootstrap, app_id, [proc], workdir)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        total = total_records(bootstrap)
        pair_id = f"bench-{uuid.uuid4().hex[:8]}"
        pair = [start_worker(bootstrap, workdir / f"w{i}", pair_id, port + 1 + i) for i in range(2)]
        try:
            for i, p in enumerate(pair):
                wait_consuming(p, port + 1 + i, workdir / f"w{i}")
            pair_s = until_committed(bootstrap, pair_id, pair, workdir)
            print(
                f"trialwatch workers (2 processes, new group, all {total:,} input records): "
                f"{pair_s:6.2f} s  {total / pair_s:9,.0f} events/s combined"
            )
        finally:
            for p in pair:
                p.terminate()
            for p in pair:
                p.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
