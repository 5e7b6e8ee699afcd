"""The ceiling of Faust's delivery path: an agent over the input topics that only takes batches and acks them.

Run by `make bench` (benchmarks/throughput.py), which prints its figure next
to the worker's: what any Faust agent on this machine can receive, before it
does any work. Prints one line, `faust-ceiling <records> <seconds>` (on stderr: Faust logs prints), once
`TOTAL` records have arrived, and exits.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import faust

from trialwatch.contract import INPUT_TOPICS

_RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}

app = faust.App(
    f"bench-faust-{uuid.uuid4().hex[:8]}",
    broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP_SERVERS']}",
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
    key_serializer="raw",
    value_serializer="raw",
)
TOTAL = int(os.environ["TOTAL"])
seen = {"records": 0, "started": 0.0}


@app.agent(app.topic(*INPUT_TOPICS, **_RAW))
async def take_and_ack(stream: Any) -> None:
    # As the worker takes its input (runtime.drive_batches), minus the work.
    async for events in stream.noack_take(2000, within=0.005):
        if not seen["records"]:
            seen["started"] = time.perf_counter()
        for event in events:
            await stream.ack(event)
        seen["records"] += len(events)
        if seen["records"] >= TOTAL:
            print(f"faust-ceiling {seen['records']} {time.perf_counter() - seen['started']:.3f}", flush=True)
            os._exit(0)


if __name__ == "__main__":
    app.main()
