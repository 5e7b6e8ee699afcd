"""The DSMB alert API, independent of the web framework: bearer-token roles, queries, acknowledgements.

Roles: `dsmb` (unblinded: the DSMB stream, acknowledgements, deliveries) and
`masked` (blinded, read-only: the masked stream only). A dsmb token may read
the masked view too; a masked token gets 403 everywhere else.

The caller's role is settled before a byte of a request body is read, and an
acknowledgement body is read through a `BodyReader` that stops at
`MAX_ACK_BODY_BYTES`: a caller without the DSMB token never makes the server
wait for, or hold, a body.
"""

from __future__ import annotations

import hmac
import json
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from trialwatch.contract import AlertMessage, MaskedAlertMessage, reveals_arm
from trialwatch.dsmb.book import AlertBook, AlertHistory
from trialwatch.dsmb.service import AckRejected, DsmbFeed, Publish, acknowledge
from trialwatch.metrics import Metrics


class Role(StrEnum):
    DSMB = "dsmb"
    MASKED = "masked"


DSMB_ONLY = frozenset({Role.DSMB})
ANY_ROLE = frozenset({Role.DSMB, Role.MASKED})


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return json.dumps(self.body, ensure_ascii=False)


class Denied(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body.get("error"))
        self.reply = reply


# An acknowledgement is a revision, a name and a comment: a few hundred bytes.
MAX_ACK_BODY_BYTES = 16 * 1024


class BodyRefused(Exception):
    """The request body was not read as sent: too large (413), too slow (408) or malformed (400)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


BodyReader = Callable[[int], Awaitable[bytes]]
"""Reads the request body, at most `limit` bytes (the argument); raises BodyRefused past it."""


def body_of(data: bytes) -> BodyReader:
    """A BodyReader over a body already in memory (tests, the fuzz suite), with the same limit."""

    async def read(limit: int) -> bytes:
        if len(data) > limit:
            raise BodyRefused(413, f"the body is limited to {limit} bytes")
        return data

    return read


def _printable(allowed: str = "") -> AfterValidator:
    """Refuse control characters (other than `allowed`) and lone surrogates: no place in an audit trail."""

    def check(text: str) -> str:
        if any(unicodedata.category(c) in ("Cc", "Cs") and c not in allowed for c in text):
            raise ValueError("control characters are not allowed")
        return text

    return AfterValidator(check)


class AckRequest(BaseModel):
    """Body of `POST /alerts/{alert_id}/ack`."""

    # Strict: `revision` is a JSON integer, never "1", 1.0 or true.
    model_config = ConfigDict(extra="forbid", strict=True)

    # The state the member saw: a newer one (the severity rose) is not acknowledged unseen.
    revision: int = Field(ge=1)
    acknowledged_by: Annotated[str, Field(min_length=1, max_length=128, pattern=r"\S"), _printable()]
    comment: Annotated[str, Field(max_length=2000), _printable("\n\r\t")] | None = None


def _duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def parse_ack(body: bytes) -> AckRequest | Reply:
    """The acknowledgement in `body`, or the 400 reply saying what is wrong with it."""
    try:
        request = AckRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, f"invalid acknowledgement: {problems[:1000]}")
    try:
        # Valid above, so a flat object of scalars: safe for the stdlib parser.
        json.loads(body, object_pairs_hook=_duplicate_keys)
    except ValueError:
        # With a duplicate key the last would silently win: which revision was meant?
        return _error(400, "invalid acknowledgement: a key appears twice")
    return request


def _error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": message}, dict(headers))


class DsmbApi:
    """Answers API requests from the feed's books; knows nothing of HTTP servers."""

    def __init__(
        self,
        feed: DsmbFeed,
        publish: Publish,
        metrics: Metrics,
        tokens: Mapping[Role, SecretStr | None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.feed = feed
        self.publish = publish
        self.metrics = metrics
        # Encoded once; a role without a token cannot be reached at all.
        self._tokens = {role: t.get_secret_value().encode() for role, t in tokens.items() if t is not None}
        if len(set(self._tokens.values())) != len(self._tokens):
            # One token, two roles: which one is the caller? (Settings refuses this too.)
            raise ValueError("each role needs a token of its own")
        self.clock = clock

    def authorize(self, authorization: str | None, allowed: frozenset[Role]) -> Role:
        """The caller's role from `Authorization: Bearer <token>`; raises Denied with 401 or 403."""
        challenge = {"WWW-Authenticate": 'Bearer realm="trialwatch"'}
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Denied(_error(401, "a bearer token is required", **challenge))
        # aiohttp passes undecodable header bytes on as surrogates: kept as
        # the bytes they were, they match no token (and raise nothing).
        given = presented.strip().encode("utf-8", "surrogateescape")
        role = None
        # Compare against every token, in constant time each, so timing
        # tells nothing about which (or whether a) token matched.
        for candidate, token in self._tokens.items():
            if hmac.compare_digest(given, token):
                role = candidate
        if role is None:
            raise Denied(_error(401, "the token is not valid", **challenge))
        if role not in allowed:
            raise Denied(_error(403, f"the {role} role may not use this endpoint"))
        if not self.feed.caught_up.is_set():
            # A half-read book would answer "no open alerts" while there are some.
            raise Denied(_error(503, "still reading the alert topics; retry in a few seconds", **{"Retry-After": "5"}))
        return role

    def list_alerts(self, authorization: str | None, query: Mapping[str, str]) -> Reply:
        self.authorize(authorization, DSMB_ONLY)
        return self._list(self.feed.dsmb, query, with_acks=True)

    def list_masked(self, authorization: str | None, query: Mapping[str, str]) -> Reply:
        self.authorize(authorization, ANY_ROLE)
        return self._list(self.feed.masked, query, with_acks=False)

    def get_alert(self, authorization: str | None, alert_id: str) -> Reply:
        self.authorize(authorization, DSMB_ONLY)
        history = self.feed.dsmb.get(alert_id)
        if history is None:
            return _error(404, "no such alert")
        return Reply(
            200,
            {
                "alert": self._summary(history, with_acks=True),
                "revisions": [r.model_dump(mode="json") for r in history.revisions],
                "acknowledgements": [a.model_dump(mode="json") for a in history.acks],
                "deliveries": [d.model_dump(mode="json") for d in history.deliveries.values()],
            },
        )

    def get_masked(self, authorization: str | None, alert_id: str) -> Reply:
        self.authorize(authorization, ANY_ROLE)
        history = self.feed.masked.get(alert_id)
        # An arm-revealing alert is not on the masked stream: to a blinded
        # reader it does not exist (404), which reveals nothing. Checked here
        # too, so a wrong record on the masked topic is never served.
        if history is None or reveals_arm(history.current.rule):
            return _error(404, "no such alert")
        return Reply(
            200,
            {
                "alert": self._summary(history, with_acks=False),
                "revisions": [r.model_dump(mode="json") for r in history.revisions],
            },
        )

    async def ack(self, authorization: str | None, alert_id: str, read_body: BodyReader) -> Reply:
        # Who is asking is settled first: the body is read for the DSMB role only.
        self.authorize(authorization, DSMB_ONLY)
        try:
            body = await read_body(MAX_ACK_BODY_BYTES)
        except BodyRefused as refused:
            return _error(refused.status, refused.message)
        request = parse_ack(body)
        if isinstance(request, Reply):
            return request
        try:
            ack, new = await acknowledge(
                self.feed,
                self.publish,
                alert_id,
                request.revision,
                request.acknowledged_by.strip(),
                request.comment,
                self.clock(),
            )
        except AckRejected as exc:
            return _error(exc.status, exc.detail)
        if new:
            self.metrics.acks_recorded.inc()
        return Reply(201 if new else 200, {"acknowledgement": ack.model_dump(mode="json"), "new": new})

    def _list(
        self,
        book: AlertBook[AlertMessage] | AlertBook[MaskedAlertMessage],
        query: Mapping[str, str],
        *,
        with_acks: bool,
    ) -> Reply:
        try:
            found = book.query(query)
        except ValueError as exc:
            return _error(400, str(exc))
        masked = book is self.feed.masked
        alerts = [self._summary(h, with_acks=with_acks) for h in found if not (masked and reveals_arm(h.current.rule))]
        return Reply(200, {"count": len(alerts), "alerts": alerts})

    @staticmethod
    def _summary(
        history: AlertHistory[AlertMessage] | AlertHistory[MaskedAlertMessage], *, with_acks: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = history.current.model_dump(mode="json")
        out["first_raised_at"] = history.revisions[0].raised_at.isoformat()
        out["revision_count"] = len(history.revisions)
        if with_acks:
            ack = history.acknowledgement
            out["acknowledgement"] = ack.model_dump(mode="json") if ack is not None else None
        return out
