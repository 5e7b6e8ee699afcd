"""One correction to faust-streaming 0.15.3's offset bookkeeping, applied when the app is built.

faust-streaming commits past a record that was never acknowledged when it is
the only one missing: `Consumer._new_offset` holds the commit only when the
lowest acked offset is *more than one* above the committed one (the committed
offset is the next record to read, so one above already means a record
missing). Together with `_drain_messages`, which drops a record whose delivery
is pending when a rebalance suspends the flow (and advances its read offset),
this loses a safety event for good: the agent never saw it and the group's
offset has passed it. Both are reproduced against the installed Faust in
tests/unit/test_watchdog.py.

The correction holds the commit at the first unacknowledged record unless
Faust itself recorded that offset as a gap in the fetched log (compaction,
transaction markers). A rebalance then re-reads from the held offset, and the
worker's skip detector and stall watchdog re-read it at once; until it is
processed nothing after it is committed. An offset that cannot be read again
(deleted by retention while the group was away) would hold the partition
forever: after `HOLD_LIMIT_S` the hold is released with an error in the log,
the one case where Faust's behaviour is kept.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from faust.transport.consumer import Consumer

log = structlog.get_logger("trialwatch.faust_fixes")

HOLD_LIMIT_S = 300.0
_upstream_new_offset = Consumer._new_offset


def _new_offset(self: Any, tp: Any) -> int | None:
    acked = self._acked[tp]
    committed = self._committed_offset[tp]
    held: dict[Any, tuple[int, float]] = self.__dict__.setdefault("_trialwatch_held", {})
    if acked and committed is not None and min(acked) > committed and not self._gap[tp].overlaps_point(committed):
        since = held.get(tp, (committed, time.monotonic()))
        if since[0] != committed:
            since = (committed, time.monotonic())
        held[tp] = since
        if time.monotonic() - since[1] < HOLD_LIMIT_S:
            log.warning(
                "commit held at an unprocessed record", topic=tp.topic, partition=tp.partition, offset=committed
            )
            return None
        log.error(
            "record never processed; committing past it", topic=tp.topic, partition=tp.partition, offset=committed
        )
    held.pop(tp, None)
    result: int | None = _upstream_new_offset(self, tp)
    return result


def hold_commits_at_unacknowledged_records() -> None:
    """Install the correction (idempotent)."""
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def upstream_new_offset(consumer: Any, tp: Any) -> int | None:
    """Faust's own `_new_offset`, for the test that shows why the correction exists."""
    result: int | None = _upstream_new_offset(consumer, tp)
    return result
