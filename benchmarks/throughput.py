"""Throughput of the live worker against the ceiling of a raw aiokafka consume->produce loop, on one broker.

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


def worker_run(bootstrap: str, workdir: Path) -> tuple[float, str]:
    """Start a worker with a new group, time it from consuming to every input committed; return its metrics too."""
    port = 16900 + os.getpid() % 100
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    proc = start_worker(bootstrap, workdir, app_id, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_consuming(proc, port, workdir)
        started = time.perf_counter()
        while not asyncio.run(committed_all(bootstrap, app_id)):
            time.sleep(0.5)
        elapsed = time.perf_counter() - started
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        return elapsed, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)
    return float(found.group(1)) if found else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
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
    with tempfile.TemporaryDirectory(prefix="trialwatch-bench-") as tmp:
        worker_s, metrics = worker_run(bootstrap, Path(tmp))
    count = metric(metrics, "trialwatch_event_processing_duration_seconds_count")
    inside = metric(metrics, "trialwatch_event_processing_duration_seconds_sum")
    print(f"trialwatch worker (1 process):            {worker_s:6.2f} s  {count / worker_s:9,.0f} events/s")
    print(f"  of which inside the worker shell: {inside:.2f} s, {1000 * inside / count:.3f} ms per event")
    print(f"  worker / raw ceiling: {raw_s / worker_s:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
