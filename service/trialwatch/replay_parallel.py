"""`trialwatch replay --jobs N`: the same replay on N processes, subjects split between them, same output.

Subjects are independent but for three things the sequential replay shares
between them: the event-time clock (the latest `occurred_at` of any valid
event so far), the order in which deadlines fire (earliest first, then by
subject) and the arm-level monitor. So each shard runs in two phases:

1. it reads every line, keeps those of its subjects (found by a cheap look
   at the line, checked against the validated event) and validates them,
   sending back each valid event's line and time, and each bad line;
2. given the timeline of every valid event of every shard, it replays: its
   own events through `Replay.apply_event`, everyone else's as a clock tick
   (`Replay.pass_by`), firing its subjects' deadlines as the sequential
   replay would, and tags everything it prints with where the sequential
   replay would have printed it.

The parent runs the arm-level monitor over the shards' facts in file order,
sorts the tagged output and prints it: byte for byte the sequential output.
Should a line's subject not be where the cheap look said (an odd line), the
parallel run is abandoned and the file replayed sequentially.
"""

from __future__ import annotations

import gc
import multiprocessing
import re
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing.connection import Connection

from trialwatch.contract import AlertMessage, InputEvent
from trialwatch.engine import Engine
from trialwatch.engine.toxicity import ArmFact
from trialwatch.replay import BadLine, Replay, read_line

_SUBJECT_AS_WRITTEN = '"subject_id": "'
_SUBJECT = re.compile(r'"subject_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
# Where an item goes in the sequential output: (line, phase, deadline, subject, n).
# Phases: 0 a bad line, 1 a deadline that fired before the line's event, 2 the
# event, 3 its arm fact. After the last line: the deadlines up to --as-of.
Key = tuple[int, int, datetime | None, str, int]
Render = Callable[[AlertMessage], str | None]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# The timeline crosses processes as three arrays of integers: line numbers,
# instants (µs since the epoch) and UTC offsets (s); pickling a list of
# aware datetimes took longer than replaying them.
Timeline = tuple["array[int]", "array[int]", "array[int]"]


def _to_timeline(items: list[tuple[int, datetime]]) -> Timeline:
    lines, instants, offsets = array("q"), array("q"), array("l")
    for line_no, at in items:
        offset = at.utcoffset()
        assert offset is not None  # the contract refuses naive times
        lines.append(line_no)
        instants.append((at - _EPOCH) // _US)
        offsets.append(offset // timedelta(seconds=1))
    return lines, instants, offsets


def _from_timeline(timeline: Timeline, own: dict[int, InputEvent]) -> Iterator[tuple[int, datetime]]:
    """(line, time) of every valid line: the event's own time where this shard holds it, else rebuilt."""
    zones: dict[int, timezone] = {}
    last: tuple[int, int, datetime] | None = None
    for line_no, instant, offset in zip(*timeline, strict=True):
        event = own.get(line_no)
        if event is not None:
            yield line_no, event.occurred_at
            continue
        # A visit's results share one time: rebuilt once.
        if last is None or last[:2] != (instant, offset):
            zone = zones.get(offset) or zones.setdefault(offset, timezone(timedelta(seconds=offset)))
            last = (instant, offset, (_EPOCH + instant * _US).astimezone(zone))
        yield line_no, last[2]


def owner(subject_id: str, shards: int) -> int:
    return zlib.crc32(subject_id.encode()) % shards


def _shard_of_line(line: str, shards: int) -> int:
    """The shard of the subject the line names first (checked against the validated event later)."""
    start = line.find(_SUBJECT_AS_WRITTEN)  # as json.dumps writes it: a plain find, five times a regex's speed
    if start >= 0:
        start += len(_SUBJECT_AS_WRITTEN)
        end = line.find('"', start)
        if end > start and "\\" not in line[start:end]:
            return owner(line[start:end], shards)
    found = _SUBJECT.search(line)
    return owner(found.group(1), shards) if found else 0


@dataclass
class Tagged:
    """A shard's output: lines for stdout and stderr, each with its key, and its arm facts."""

    out: list[tuple[Key, str]] = field(default_factory=list)
    err: list[tuple[Key, str]] = field(default_factory=list)
    facts: list[tuple[int, ArmFact, datetime]] = field(default_factory=list)

    def add(
        self,
        at: tuple[int, int, datetime | None, str],
        alerts: list[AlertMessage],
        errors: list[str],
        label: str,
        render: Render,
    ) -> None:
        """Alerts and errors produced at one place of the sequential output (`at`: a Key without its count)."""
        self.out += [((*at, i), text) for i, a in enumerate(alerts) if (text := render(a)) is not None]
        self.err += [((*at, i), f"{label}: {e}") for i, e in enumerate(errors)]


def _validate(lines: list[str], shard: int, shards: int, tagged: Tagged) -> tuple[dict[int, InputEvent], bool]:
    """Phase 1: this shard's lines validated; whether every one was its subject's."""
    events: dict[int, InputEvent] = {}
    consistent = True
    for line_no, line in enumerate(lines, start=1):
        if _shard_of_line(line, shards) != shard or (item := read_line(line_no, line)) is None:
            continue
        if isinstance(item, BadLine):
            tagged.err.append(((line_no, 0, None, "", 0), f"line {line_no}: {item.reason}: {item.detail}"))
        else:
            events[line_no] = item
            consistent = consistent and owner(item.subject_id, shards) == shard
    return events, consistent


def _replay_shard(
    replay: Replay,
    events: dict[int, InputEvent],
    timeline: Timeline,
    as_of: datetime | None,
    end: int,
    render: Render,
    tagged: Tagged,
) -> None:
    """Phase 2: every valid line of the file in order, this shard's events applied, the others' passed by."""

    def ticks(line_no: int, at: datetime, label: str) -> None:
        for deadline, sid, alerts in replay.fire_due(at):
            tagged.out += [
                ((line_no, 1, deadline, sid, i), t) for i, a in enumerate(alerts) if (t := render(a)) is not None
            ]
            tagged.err += [
                ((line_no, 1, deadline, sid, i), f"{label}: {e}") for i, e in enumerate(replay.take_errors())
            ]

    for line_no, at in _from_timeline(timeline, events):
        ticks(line_no, at, f"line {line_no}")
        event = events.get(line_no)
        if event is None:
            replay.pass_by(at)
            continue
        alerts, fact = replay.apply_event(event)
        tagged.add((line_no, 2, None, ""), alerts, replay.take_errors(), f"line {line_no}", render)
        if fact is not None:
            tagged.facts.append((line_no, *fact))
    if as_of is not None:
        ticks(end, as_of, "as of the end")
        replay.pass_by(as_of)


def _shard_main(
    conn: Connection, make_engine: Callable[[], Engine], lines: list[str], shard: int, shards: int, render: Render
) -> None:
    # What the shard inherited and the events it validated live to its end:
    # kept out of the collector's way (each full collection walked them all).
    gc.freeze()
    tagged = Tagged()
    events, consistent = _validate(lines, shard, shards, tagged)
    gc.freeze()
    conn.send((_to_timeline([(n, e.occurred_at) for n, e in events.items()]), consistent))
    request: tuple[Timeline, datetime | None] | None = conn.recv()
    if request is None:
        return
    timeline, as_of = request
    _replay_shard(Replay(make_engine()), events, timeline, as_of, len(lines) + 1, render, tagged)
    conn.send(tagged)


def replay_parallel(
    lines: list[str], make_engine: Callable[[], Engine], jobs: int, as_of: datetime | None, render: Render
) -> tuple[list[str], list[str]] | None:
    """The replay's stdout and stderr lines, computed on `jobs` processes; None when a line's subject was misjudged."""
    context = multiprocessing.get_context("fork")
    pipes, processes = [], []
    for shard in range(jobs):
        parent, child = context.Pipe()
        process = context.Process(target=_shard_main, args=(child, make_engine, lines, shard, jobs, render))
        process.start()
        pipes.append(parent)
        processes.append(process)
    try:
        phase1 = [pipe.recv() for pipe in pipes]
        if not all(consistent for _, consistent in phase1):
            for pipe in pipes:
                pipe.send(None)
            return None
        timeline = _merge_timelines([valid for valid, _ in phase1])
        for pipe in pipes:
            pipe.send((timeline, as_of))
        shards: list[Tagged] = [pipe.recv() for pipe in pipes]
    finally:
        for process in processes:
            process.join()
    return _merge(shards, make_engine, render)


def _merge_timelines(parts: list[Timeline]) -> Timeline:
    """The shards' valid lines as one timeline in line order."""
    rows = sorted(row for part in parts for row in zip(*part, strict=True))
    return array("q", (r[0] for r in rows)), array("q", (r[1] for r in rows)), array("l", (r[2] for r in rows))


def _merge(shards: list[Tagged], make_engine: Callable[[], Engine], render: Render) -> tuple[list[str], list[str]]:
    """The shards' output in sequential order, with the arm-level monitor run over their facts in file order."""
    merged = Tagged(
        out=[item for tagged in shards for item in tagged.out],
        err=[item for tagged in shards for item in tagged.err],
    )
    arms = Replay(make_engine())
    for line_no, fact, now in sorted((f for tagged in shards for f in tagged.facts), key=lambda f: f[0]):
        alerts = arms.apply_fact(fact, now)
        merged.add((line_no, 3, None, ""), alerts, arms.take_errors(), f"line {line_no}", render)
    return [text for _, text in sorted(merged.out, key=_order)], [text for _, text in sorted(merged.err, key=_order)]


def _order(item: tuple[Key, str]) -> tuple[int, int, datetime | int, str, int]:
    line_no, phase, deadline, sid, n = item[0]
    return line_no, phase, deadline if deadline is not None else 0, sid, n
