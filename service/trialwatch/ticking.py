"""Which due deadlines to tick now: a pure policy, so the worker's timer only asks and sends.

A deadline is due once the wall clock passes it (the worker's `DeadlineIndex`
says which). Its tick is deferred while the subject's treatment partition
has records not yet processed, up to `max_defer_s` past the deadline, so a
backfilled history (a start months old, its fractions right behind it) is
judged complete instead of raising an alert the next record resolves. A tick
is sent once per deadline, and again only if `resend_after_s` pass without
the deadline being decided (a tick lost with a worker that died).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

Due = tuple[int, bytes, datetime]  # (partition, subject key, deadline)


@dataclass
class TickPolicy:
    max_defer_s: float
    resend_after_s: float = 30.0
    # Per subject key: the deadline last ticked and when (monotonic seconds).
    sent: dict[bytes, tuple[datetime, float]] = field(default_factory=dict)

    def select(self, due: Iterable[Due], now: datetime, monotonic: float, behind: Callable[[int], bool]) -> list[Due]:
        """The due deadlines to tick now; `behind(partition)`: its treatment records are not all processed."""
        out = []
        for partition, key, deadline in due:
            if (now - deadline).total_seconds() < self.max_defer_s and behind(partition):
                continue  # judge the deadline on the complete treatment history
            previous = self.sent.get(key)
            if previous is not None and previous[0] == deadline and monotonic - previous[1] < self.resend_after_s:
                continue
            out.append((partition, key, deadline))
        return out

    def ticked(self, key: bytes, deadline: datetime, monotonic: float) -> None:
        self.sent[key] = (deadline, monotonic)
