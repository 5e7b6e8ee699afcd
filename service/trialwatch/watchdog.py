"""Detect input partitions whose records were fetched but never processed, and say where to re-read.

Why this exists: faust-streaming 0.15.3 can drop records that aiokafka has
already drained when a worker starts or rebalances (seen here: after a
restart, the first record published while the worker was down was never
handed to the agent, and nothing re-read it). Kafka's position had moved past
it, so it would never come back: a lost safety event. The engine ignores an
`event_id` it has seen, so seeking back to the committed offset is always
safe; missing an event never is.
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
