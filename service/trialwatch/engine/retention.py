"""What a subject's state keeps, and for how long: the retention horizon.

A subject is followed for years; its state must not grow with its history.
Each rule module declares, next to its rules, what they read of the past:

- `labs.pinned_results`: per analyte, the baseline (the last results at or
  before the first second-line start) and every result an open lab alert
  rests on;
- `subject_rules.rild_pins`, `subject_rules.eligibility_pins`: the results in
  the RILD window after the first fraction and in the screening window;
- `labs.REMEMBERS_EPISODES`: closed episodes, for the lab rules only (a late
  result inside one does not reopen it);
- `treatment.REMEMBERS_RESOLVED`: resolved alerts, for the rules that fire
  once per subject (the SBRT window); other rules forget an alert once it is
  resolved (their next episode is a new alert in any case);
- `adverse_events.pinned_reports` and `toxicity.pinned_reports`: the adverse
  events with an open alert or counted by the arm-level monitor.

Everything else is kept up to the bounds below and then forgotten, oldest
first. Past the horizon (see the README, "Subject state"):

- a correction or cancellation of a forgotten lab result is a new result (a
  cancellation of one changes nothing); a forgotten AE's update is a new AE;
- an event id re-sent after `SEEN_EVENT_IDS` newer events of its subject is
  recognised only if it is still the current version of its result, AE, scan,
  treatment event or enrolment (re-applying any other is, at worst, the same
  as a late correction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import timedelta

from trialwatch.engine.state import AdverseEventReport, Episode, LabResult, SubjectState, TreatmentEvent

# Event ids remembered per subject (8-byte fingerprints, 2 kB): months of a
# subject's events at trial visit rates; Kafka's own re-delivery after a
# crash is the records since the last commit (seconds). Past it, an event
# that is still the current version of what it describes is recognised too.
SEEN_EVENT_IDS = 256
FINGERPRINT_BYTES = 8
# Per analyte: the newest RESULTS_KEPT always, and every result within
# RESULTS_RECENT_DAYS of the newest up to RESULTS_MAX, plus the pinned ones.
RESULTS_KEPT = 12
RESULTS_RECENT_DAYS = 30
RESULTS_MAX = 32
# Forgetting runs when a series' length reaches a multiple of this (past
# RESULTS_KEPT): a series holds at most this many results above its bound,
# and the cost of deciding is paid once per that many results.
COMPACT_EVERY = 4
# A rule pins at most this many results of one analyte.
PINNED_MAX = 32
# Adverse events without an open alert and not counted: the newest kept.
ADVERSE_EVENTS_KEPT = 32
# Counted adverse events kept (more only increments counted_forgotten).
COUNTED_KEPT = 64
# Treatment events of one kind: the earliest kept (the rules read the first ones).
TREATMENTS_KEPT = 32
# Scans: the latest baseline and the newest follow-ups.
SCANS_KEPT = 64
# Closed episodes of one alert key: the newest.
EPISODES_KEPT = 32

Pins = Callable[[SubjectState, str], Iterable[str]]


def fingerprint(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=FINGERPRINT_BYTES).digest()


def fingerprint_int(event_id: str) -> int:
    return int.from_bytes(fingerprint(event_id), "big")


def _seen_set(state: SubjectState) -> set[bytes]:
    index: set[bytes] | None = state.__dict__.get("_seen_index")
    if index is None:
        raw, n = state.seen, FINGERPRINT_BYTES
        index = {raw[i : i + n] for i in range(0, len(raw), n)}
        state.__dict__["_seen_index"] = index
    return index


def first_time(state: SubjectState, event_id: str) -> bool:
    """False when the id is among the subject's recent ids; else True, and it is now."""
    digest = fingerprint(event_id)
    if digest in _seen_set(state):
        return False
    _remember(state, digest)
    return True


def remember(state: SubjectState, event_id: str) -> None:
    _remember(state, fingerprint(event_id))


def _remember(state: SubjectState, digest: bytes) -> None:
    """Add the fingerprint to the subject's recent ids, forgetting the oldest past SEEN_EVENT_IDS."""
    index = _seen_set(state)
    ring = state.seen + digest
    index.add(digest)
    if len(ring) > SEEN_EVENT_IDS * FINGERPRINT_BYTES:
        index.discard(ring[:FINGERPRINT_BYTES])
        ring = ring[FINGERPRINT_BYTES:]
    state.seen = ring


def compact_series(state: SubjectState, analyte: str, pins: Iterable[Pins]) -> None:
    """Forget the analyte's results past the horizon that no rule pins."""
    series = state.labs.get(analyte)
    if series is None or len(series.results) <= RESULTS_KEPT or len(series.results) % COMPACT_EVERY:
        return
    results = series.results
    recent_from = results[-1].at - timedelta(days=RESULTS_RECENT_DAYS)
    keep = {r.result_id for r in results[-RESULTS_KEPT:]}
    keep.update(r.result_id for r in results[-RESULTS_MAX:] if r.at >= recent_from)
    for pin in pins:
        keep.update(pin(state, analyte))
    if len(keep) >= len(results):
        return
    kept: list[LabResult] = []
    for r in results:
        if r.result_id in keep:
            kept.append(r)
        elif series.forgotten_through is None or r.at > series.forgotten_through:
            series.forgotten_through = r.at
    series.results = kept


def newest(results: Iterable[LabResult]) -> list[str]:
    """Ids of the newest PINNED_MAX of `results` (given in clinical-time order)."""
    ids = [r.result_id for r in results]
    return ids[-PINNED_MAX:]


def compact_adverse_events(state: SubjectState, pinned: set[str], counted: set[str]) -> None:
    """Forget the oldest adverse events past ADVERSE_EVENTS_KEPT that have no open alert.

    Counted ones (`counted`, a subset of the keys) are kept up to COUNTED_KEPT;
    beyond that each one forgotten still counts (counted_forgotten).
    """
    reports = state.adverse_events
    if len(reports) <= ADVERSE_EVENTS_KEPT + len(pinned):
        return

    def by_time(keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda k: (reports[k].at, reports[k].seq))

    keep = set(pinned)
    keep.update(by_time(counted - pinned)[-COUNTED_KEPT:])
    keep.update(by_time(set(reports) - counted - pinned)[-ADVERSE_EVENTS_KEPT:])
    kept: dict[str, AdverseEventReport] = {}
    for key, report in reports.items():
        if key in keep:
            kept[key] = report
        elif key in counted:
            state.counted_forgotten += 1
    state.adverse_events = kept


def add_treatment(items: list[TreatmentEvent], item: TreatmentEvent) -> None:
    """Add a treatment event, keeping the earliest TREATMENTS_KEPT of its kind."""
    items.append(item)
    if len(items) > TREATMENTS_KEPT:
        items.remove(max(items, key=lambda i: (i.at, i.seq)))


def add_episode(episodes: list[Episode], episode: Episode) -> None:
    """Add a closed episode, merged with those it overlaps; the newest EPISODES_KEPT kept."""
    merged = [episode]
    for ep in episodes:
        if ep.ended_at >= episode.started_at and ep.started_at <= episode.ended_at:
            merged.append(ep)
    if len(merged) > 1:
        start = min(ep.started_at for ep in merged)
        end = max(ep.ended_at for ep in merged)
        episodes[:] = [ep for ep in episodes if ep not in merged[1:]]
        episode = Episode(started_at=start, ended_at=end)
    episodes.append(episode)
    if len(episodes) > EPISODES_KEPT:
        episodes.remove(min(episodes, key=lambda ep: ep.ended_at))
