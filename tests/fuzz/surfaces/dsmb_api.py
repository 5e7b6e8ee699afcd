"""DSMB API in-process (`DsmbApi`, no web framework): hostile tokens, alert ids, query strings and ack bodies.

Every request gets a reply; a 5xx other than the documented 503 (alert books
not read yet) is a defect, and so is any of these, checked on every reply:
a 2xx without a valid token; an ack body read before the DSMB role was
settled; a masked-view reply holding an `arm` or an arm-revealing rule; a 201
that wrote nothing to the ack topic, or anything written without a 201.
The sizes reported are those of the reply bodies.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tests.fuzz.harness import HOSTILE_STRINGS, Outcome, Surface, deep_nesting, hostile_value, mutate_bytes
from tests.unit.test_dsmb import DSMB_TOKEN, MASKED_TOKEN, T0, FakePublisher, alert, feed_of
from trialwatch.contract import AlertMessage, reveals_arm
from trialwatch.dsmb.api import MAX_ACK_BODY_BYTES, Denied, DsmbApi, Reply, Role, body_of
from trialwatch.dsmb.book import FILTERS
from trialwatch.dsmb.service import DsmbFeed
from trialwatch.metrics import Metrics

ENDPOINTS = ("list", "masked_list", "detail", "masked_detail", "ack", "ack", "ack")
MASKED_ENDPOINTS = frozenset({"masked_list", "masked_detail"})
TOKENS = {DSMB_TOKEN: Role.DSMB, MASKED_TOKEN: Role.MASKED}


def _alerts() -> list[AlertMessage]:
    """A small trial's alerts: both arms, arm-revealing rules, severities that rose, resolutions."""
    out = []
    for i, (rule, arm) in enumerate(
        [
            ("lab.platelets.low", "sbrt"),
            ("ae.grade3plus", "control"),
            ("sbrt.window.missed", "sbrt"),
            ("rild.suspected", "sbrt"),
            ("dsmb.toxicity_boundary", "sbrt"),
            ("protocol.crossover", "control"),
            ("eligibility.violation", "control"),
        ]
    ):
        alert_id = f"alert-{i}"
        subject = f"TW-{100 + i}"
        out.append(alert(1, alert_id=alert_id, rule=rule, arm=arm, subject_id=subject))
        if i % 2 == 0:
            out.append(alert(2, alert_id=alert_id, rule=rule, arm=arm, subject_id=subject, severity="critical"))
        if i % 3 == 0:
            out.append(alert(3, alert_id=alert_id, rule=rule, arm=arm, subject_id=subject, status="resolved"))
    return out


ALERTS = _alerts()
ALERT_IDS = sorted({a.alert_id for a in ALERTS})
REVEALING_IDS = frozenset(a.alert_id for a in ALERTS if reveals_arm(a.rule))


@dataclass
class World:
    """The API under test, over books fed once; one event loop for every acknowledgement."""

    feed: DsmbFeed
    publisher: FakePublisher
    api: DsmbApi
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)


def _build() -> World:
    feed = feed_of(ALERTS)
    publisher = FakePublisher()
    tokens = {Role.DSMB: SecretStr(DSMB_TOKEN), Role.MASKED: SecretStr(MASKED_TOKEN)}
    api = DsmbApi(feed, publisher, Metrics(CollectorRegistry()), tokens, clock=lambda: T0 + timedelta(hours=2))
    return World(feed, publisher, api)


_world: World | None = None


def setup() -> None:
    global _world
    _world = _build()


def teardown() -> None:
    global _world
    if _world is not None:
        _world.loop.close()
        _world = None


@dataclass(frozen=True)
class Case:
    endpoint: str
    authorization: str | None
    alert_id: str
    query: dict[str, str]
    body: bytes
    caught_up: bool


def generate(rng: random.Random) -> Case:
    endpoint = rng.choice(ENDPOINTS)
    return Case(
        endpoint=endpoint,
        authorization=_authorization(rng),
        alert_id=_alert_id(rng),
        query=_query(rng) if endpoint in ("list", "masked_list") else {},
        body=_body(rng) if endpoint == "ack" else b"",
        caught_up=rng.random() > 0.03,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _authorization(rng: random.Random) -> str | None:
    roll = rng.random()
    token = DSMB_TOKEN if rng.random() < 0.75 else MASKED_TOKEN
    if roll < 0.7:
        return rng.choice((f"Bearer {token}", f"bearer {token}", f"Bearer   {token}  ", f"BEARER {token}"))
    if roll < 0.78:
        return rng.choice((None, "", "Bearer", "Bearer ", f"Basic {token}", token, f"Bearer {token} {token}"))
    if roll < 0.92:
        # As aiohttp hands header bytes over: decoded as UTF-8, undecodable bytes as surrogates.
        return mutate_bytes(rng, f"Bearer {token}".encode()).decode("utf-8", "surrogateescape")
    return f"Bearer {_text(hostile_value(rng))[:9000]}"


def _alert_id(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(ALERT_IDS)
    if roll < 0.8:
        return rng.choice((*HOSTILE_STRINGS, "../alerts", "alert-0/ack", "%2e%2e", "alert-0\x00", "ALERT-0"))
    return mutate_bytes(rng, rng.choice(ALERT_IDS).encode()).decode("utf-8", "surrogateescape")


def _query(rng: random.Random) -> dict[str, str]:
    query: dict[str, str] = {}
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        name = rng.choice(FILTERS) if rng.random() < 0.8 else _text(rng.choice((*HOSTILE_STRINGS, "arm")))
        if rng.random() < 0.5:
            values = [rng.choice(("critical", "high", "firing", "resolved", "lab.platelets.low", "TW-101", "SITE-GZ"))]
            value = ",".join(values * rng.randint(1, 3))
        else:
            value = _text(hostile_value(rng))[:10_000]
        query[name] = value
    return query


def _ack(rng: random.Random) -> dict[str, Any]:
    return {
        "revision": rng.choice((1, 2, 3, 1, 2)),
        "acknowledged_by": rng.choice(("Dr Lin", "林医生", "x" * 128)),
        **({"comment": "seen"} if rng.random() < 0.5 else {}),
    }


def _body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return json.dumps(_ack(rng), ensure_ascii=rng.random() < 0.5).encode()
    if roll < 0.55:
        ack = _ack(rng)
        ack[rng.choice(("revision", "acknowledged_by", "comment", "extra"))] = hostile_value(rng)
        return json.dumps(ack).encode()
    if roll < 0.8:
        return mutate_bytes(rng, json.dumps(_ack(rng)).encode())
    if roll < 0.88:
        return deep_nesting(rng)
    if roll < 0.95:
        return json.dumps(hostile_value(rng)).encode()
    # Past the limit, or right at it.
    size = rng.choice((MAX_ACK_BODY_BYTES, MAX_ACK_BODY_BYTES + 1, rng.randint(20_000, 2_000_000)))
    head = b'{"revision": 1, "acknowledged_by": "Dr Lin", "comment": "'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


class Defect(AssertionError):
    """An invariant of the API broke (the harness counts it as an exception)."""


def _role(authorization: str | None) -> Role | None:
    """The role this header should get, worked out independently of `DsmbApi.authorize`."""
    scheme, _, presented = (authorization or "").partition(" ")
    return TOKENS.get(presented.strip()) if scheme.lower() == "bearer" else None


def _call(world: World, case: Case, reads: list[int]) -> Reply:
    api = world.api

    async def reader(limit: int) -> bytes:
        reads.append(limit)
        return await body_of(case.body)(limit)

    calls = {
        "list": lambda: api.list_alerts(case.authorization, case.query),
        "masked_list": lambda: api.list_masked(case.authorization, case.query),
        "detail": lambda: api.get_alert(case.authorization, case.alert_id),
        "masked_detail": lambda: api.get_masked(case.authorization, case.alert_id),
        "ack": lambda: world.loop.run_until_complete(api.ack(case.authorization, case.alert_id, reader)),
    }
    try:
        reply: Reply = calls[case.endpoint]()
    except Denied as denied:
        reply = denied.reply
    return reply


def _holds_arm(value: Any) -> bool:
    if isinstance(value, dict):
        if "arm" in value or ("rule" in value and reveals_arm(str(value["rule"]))):
            return True
        return any(_holds_arm(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_arm(v) for v in value)
    return False


def _verify(case: Case, reply: Reply, reads: list[int], written: int) -> None:
    status, role = reply.status, _role(case.authorization)
    if status >= 500 and not (status == 503 and not case.caught_up and role is not None):
        raise Defect(f"{status}: {reply.body}")
    if status < 300 and (role is None or (role is Role.MASKED and case.endpoint not in MASKED_ENDPOINTS)):
        raise Defect(f"{status} for a caller that is not allowed here ({role})")
    if reads and role is not Role.DSMB:
        raise Defect(f"the body was read for a caller with role {role}")
    if reads != ([MAX_ACK_BODY_BYTES] if reads else []):
        raise Defect(f"the body was read {len(reads)} times, limits {reads[:3]}")
    if case.endpoint in MASKED_ENDPOINTS and status < 300 and _holds_arm(reply.body):
        raise Defect("the masked view revealed the arm")
    if case.endpoint == "masked_detail" and case.alert_id in REVEALING_IDS and status < 300:
        raise Defect("an arm-revealing alert was served to the masked view")
    if (status == 201) != (written == 1) or written > 1:
        raise Defect(f"{status} with {written} acknowledgement(s) written")


def check(case: Case) -> Outcome:
    world = _world
    if world is None:  # run without setup (a single check from a debugger)
        setup()
        world = _world
        assert world is not None
    if case.caught_up:
        world.feed.caught_up.set()
    else:
        world.feed.caught_up.clear()
    world.publisher.sent.clear()
    reads: list[int] = []
    reply = _call(world, case, reads)
    size = len(reply.text().encode("utf-8", "surrogatepass"))
    _verify(case, reply, reads, len(world.publisher.sent))
    if 200 <= reply.status < 300:
        return Outcome.ok(size)
    return Outcome.refused(str(reply.status), size)


SURFACE = Surface("dsmb_api", generate, check, setup=setup, teardown=teardown)
