"""Find input records the consumer dropped, and say where to re-read.

Why this exists (root cause, reproduced against the installed Faust in
tests/unit/test_watchdog.py): faust-streaming 0.15.3's `_drain_messages`
hands each fetched record to the streams while racing the consumer's
`suspend_flow` event; when a rebalance starts while a delivery waits (the
agent's buffer full), the delivery is cancelled and the record's read offset
is advanced anyway, so the agent never sees it. Faust's `_new_offset` then
commits past it when it is the only record missing, and the rebalance seeks
to that commit: a lost safety event. `faust_fixes` holds commits at such a
record; this module finds it so it is re-read at once:

- `SkipDetector`: a jump in a partition's offsets within one generation
  (a record dropped in the middle);
- `find_stalls`: records beyond the committed offset while the agent is idle
  (dropped at the end, where no later record reveals the gap).

The engine ignores an `event_id` it has seen, so re-reading is always safe;
missing an event never is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

TP = TypeVar("TP")


@dataclass(frozen=True, slots=True)
class Stall(Generic[TP]):
    tp: TP
    committed: int
    highwater: int


def find_stalls(
    committed: Mapping[TP, int | None],
    highwater: Mapping[TP, int | None],
    *,
    idle_s: float,
    idle_threshold_s: float,
    busy: bool,
    already_tried: Mapping[TP, tuple[int, int]],
) -> list[Stall[TP]]:
    """Partitions with records beyond the committed offset although the agent has been idle.

    Idle longer than a commit interval means everything processed has been
    committed, so `highwater > committed` means records nobody is working
    on. A partition already re-read at the same (committed, highwater) is not
    returned again: offsets taken by transaction markers would otherwise
    trigger a seek on every check.
    """
    if busy or idle_s < idle_threshold_s:
        return []
    stalls = []
    for tp, end in highwater.items():
        start = committed.get(tp)
        if end is None or start is None or end <= start:
            continue
        if already_tried.get(tp) == (start, end):
            continue
        stalls.append(Stall(tp, start, end))
    return stalls


@dataclass(frozen=True, slots=True)
class Skip:
    """Records `first` .. `next_seen - 1` of a partition were never handed to the agent."""

    topic: str
    partition: int
    first: int
    next_seen: int


class SkipDetector:
    """Records the consumer skipped in the middle of a partition: what the idle watchdog cannot see.

    Within one group generation Faust fetches each partition in order, and
    the input topics are neither compacted nor transactional, so the offsets
    the agent sees must follow each other. A jump means records were dropped
    between the fetch and the agent (faust-streaming cancels a record's
    delivery when a rebalance suspends the flow and still advances its read
    offset; with one record missing it then commits past it: see
    tests/unit/test_watchdog.py). The caller seeks back to `first`; the
    records after the gap were processed already and come back as duplicates,
    which the engine ignores.
    """

    def __init__(self) -> None:
        self.generation: object = None
        self.expected: dict[tuple[str, int], int] = {}

    def check(self, generation: object, coordinates: list[tuple[str, int, int]]) -> list[Skip]:
        """Skips among (topic, partition, offset) in the order the agent got them; resets on a new generation."""
        if generation != self.generation:
            self.generation = generation
            self.expected.clear()
        skips = []
        for topic, partition, offset in coordinates:
            key = (topic, partition)
            expected = self.expected.get(key)
            if expected is not None and offset > expected:
                skips.append(Skip(topic, partition, expected, offset))
            # Below what was expected: a re-read after a seek back; follow it.
            self.expected[key] = offset + 1
        return skips
