"""DSMB delivery without Kafka: the alert books, what the notifier owes, the API's roles, filters and acks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr, ValidationError

from trialwatch.contract import ALERT_ACKS, TREATMENT, AlertAck, AlertMessage, mask, reveals_arm
from trialwatch.decode import Rejection, decode
from trialwatch.dsmb.api import DsmbApi, Role, body_of
from trialwatch.dsmb.book import AlertBook, Delivery, ack_id
from trialwatch.dsmb.notify import Receiver, backoff_s, delivery_id, owed, sign, verify
from trialwatch.dsmb.service import DsmbFeed
from trialwatch.metrics import Metrics
from trialwatch.settings import Settings

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EventFactory

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
# Made-up tokens of a realistic length (Settings refuses fewer than 32 characters).
DSMB_TOKEN = "dsmb-token-7f3a0c1e9b2d4a6f8e0c1b3d5f7a9c2e"
MASKED_TOKEN = "masked-token-91c2d4e6f8a0b2c4d6e8f0a1b3c5d7e9"
PRIMARY = (Receiver("primary", "http://dsmb.example/hook"), Receiver("primary", "http://pager.example/hook"))
ESCALATION = (Receiver("escalation", "http://chair.example/hook"),)
HOUR = timedelta(hours=1)


def alert(revision: int = 1, status: str = "firing", severity: str = "high", **overrides: Any) -> AlertMessage:
    fields: dict[str, Any] = {
        "alert_id": "alert-1",
        "revision": revision,
        "status": status,
        "rule": "lab.platelets.low",
        "severity": severity,
        "subject_id": "TW-001",
        "site_id": "SITE-GZ",
        "arm": "sbrt",
        "occurred_at": T0,
        "raised_at": T0 + timedelta(minutes=revision),
        "ctcae_grade": 3,
        "evidence": {"event_ids": ["lab-1"]},
        "summary": "Platelets low",
    }
    fields.update(overrides)
    return AlertMessage(**fields)


def raw(message: AlertMessage) -> bytes:
    return message.model_dump_json().encode()


def feed_of(alerts: list[AlertMessage]) -> DsmbFeed:
    """A feed whose books hold these alerts on both streams, as the worker publishes them."""
    feed = DsmbFeed(["unused:9092"], "ledger")
    for a in alerts:
        feed.dsmb.add_alert(raw(a))
        masked = mask(a)
        if masked is not None:
            feed.masked.add_alert(masked.model_dump_json().encode())
    return feed


def ack(alert_id: str, revision: int, by: str = "Dr Lin") -> AlertAck:
    return AlertAck(
        ack_id=ack_id(alert_id, revision),
        alert_id=alert_id,
        revision=revision,
        acknowledged_by=by,
        acknowledged_at=T0 + timedelta(hours=1),
    )


def delivered(message: AlertMessage, kind: str, receiver: Receiver, outcome: str = "delivered") -> Delivery:
    return Delivery(
        delivery_id=delivery_id(message.alert_id, message.revision, kind, receiver),
        alert_id=message.alert_id,
        revision=message.revision,
        kind=kind,  # type: ignore[arg-type]
        receiver=receiver.key,
        outcome=outcome,  # type: ignore[arg-type]
        attempts=1,
        at=T0,
    )


class TestAlertBook:
    def test_a_revision_read_twice_is_kept_once(self) -> None:
        """At-least-once upstream: a re-sent (alert_id, revision) is not a new state."""
        book = AlertBook(AlertMessage)
        assert book.add_alert(raw(alert(1))) is not None
        assert book.add_alert(raw(alert(1))) is None
        assert [1] == [r.revision for r in book.alerts["alert-1"].revisions]

    def test_unreadable_record_is_skipped_not_fatal(self) -> None:
        book = AlertBook(AlertMessage)
        assert book.add_alert(b"{not json") is None
        assert {} == book.alerts

    def test_ack_read_before_its_alert_is_applied_when_the_alert_arrives(self) -> None:
        """The ack and alert topics are read side by side; an ack may come first."""
        book = AlertBook(AlertMessage)
        book.add_ack(ack("alert-1", 1))
        book.add_alert(raw(alert(1)))
        history = book.get("alert-1")
        assert history is not None
        assert history.acknowledgement is not None

    def test_severity_rise_needs_a_new_acknowledgement(self) -> None:
        """What was acknowledged at 'high' is not what fires at 'critical'."""
        book = AlertBook(AlertMessage)
        book.add_alert(raw(alert(1, severity="high")))
        book.add_ack(ack("alert-1", 1))
        book.add_alert(raw(alert(2, severity="critical")))
        history = book.get("alert-1")
        assert history is not None
        assert history.acknowledgement is None
        assert ["alert-1"] == [h.current.alert_id for h in book.unacknowledged("critical")]

    def test_resolution_keeps_the_acknowledgement_of_the_last_firing_state(self) -> None:
        book = AlertBook(AlertMessage)
        book.add_alert(raw(alert(1)))
        book.add_ack(ack("alert-1", 1))
        book.add_alert(raw(alert(2, status="resolved")))
        history = book.get("alert-1")
        assert history is not None
        assert history.acknowledgement is not None
        assert [] == list(book.unacknowledged("high"))

    def test_query_orders_by_severity_then_longest_open(self) -> None:
        book = AlertBook(AlertMessage)
        book.add_alert(raw(alert(1, alert_id="late-high", severity="high", raised_at=T0 + 2 * HOUR)))
        book.add_alert(raw(alert(1, alert_id="early-high", severity="high", raised_at=T0)))
        book.add_alert(raw(alert(1, alert_id="warning", severity="warning", raised_at=T0 - HOUR)))
        book.add_alert(raw(alert(1, alert_id="critical", severity="critical", raised_at=T0 + 3 * HOUR)))
        assert ["critical", "early-high", "late-high", "warning"] == [h.current.alert_id for h in book.query()]

    def test_query_filters_combine_and_take_lists(self) -> None:
        book = AlertBook(AlertMessage)
        book.add_alert(raw(alert(1, alert_id="a", site_id="SITE-GZ", severity="high")))
        book.add_alert(raw(alert(1, alert_id="b", site_id="SITE-BJ", severity="critical")))
        book.add_alert(raw(alert(1, alert_id="c", site_id="SITE-BJ", severity="warning")))
        book.add_alert(raw(alert(2, alert_id="c", site_id="SITE-BJ", severity="warning", status="resolved")))
        found = book.query({"site_id": "SITE-BJ", "severity": "critical,warning", "status": "firing"})
        assert ["b"] == [h.current.alert_id for h in found]

    def test_unknown_filter_is_an_error_not_everything(self) -> None:
        book = AlertBook(AlertMessage)
        with pytest.raises(ValueError, match="arm"):
            book.query({"arm": "sbrt"})


class TestWhatIsOwed:
    def book_with(self, *messages: AlertMessage) -> AlertBook[AlertMessage]:
        book = AlertBook(AlertMessage)
        for m in messages:
            book.add_alert(raw(m))
        return book

    def test_every_primary_receiver_gets_the_first_revision(self) -> None:
        book = self.book_with(alert(1))
        jobs, _ = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0)
        assert {(r.url, 1, "alert") for r in PRIMARY} == {(j.receiver.url, j.alert.revision, j.kind) for j in jobs}

    def test_revisions_go_out_in_order_per_receiver(self) -> None:
        """'resolved' must not reach a receiver that has not had 'firing'."""
        book = self.book_with(alert(1), alert(2, status="resolved"))
        first, second = PRIMARY
        book.add_delivery(delivered(alert(1), "alert", first))
        jobs, _ = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0)
        assert {(first.url, 2), (second.url, 1)} == {(j.receiver.url, j.alert.revision) for j in jobs}

    def test_a_given_up_delivery_does_not_block_the_next_revision(self) -> None:
        book = self.book_with(alert(1), alert(2, status="resolved"))
        for r in PRIMARY:
            book.add_delivery(delivered(alert(1), "alert", r, outcome="gave_up"))
        jobs, _ = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0)
        assert {2} == {j.alert.revision for j in jobs}

    def test_unacknowledged_critical_escalates_after_the_configured_time_to_both_lists(self) -> None:
        critical = alert(1, severity="critical")
        book = self.book_with(critical)
        for r in PRIMARY:
            book.add_delivery(delivered(critical, "alert", r))
        history = book.alerts["alert-1"]
        early, next_due = owed(history, PRIMARY, ESCALATION, HOUR, critical.raised_at + HOUR - timedelta(seconds=1))
        assert ([], critical.raised_at + HOUR) == (early, next_due)
        jobs, _ = owed(history, PRIMARY, ESCALATION, HOUR, critical.raised_at + HOUR)
        assert {r.url for r in (*PRIMARY, *ESCALATION)} == {j.receiver.url for j in jobs}
        assert {"escalation"} == {j.kind for j in jobs}

    def test_escalation_clock_starts_when_the_alert_became_critical(self) -> None:
        high, critical = alert(1, severity="high"), alert(2, severity="critical", raised_at=T0 + 5 * HOUR)
        book = self.book_with(high, critical)
        _, next_due = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0 + 2 * HOUR)
        assert critical.raised_at + HOUR == next_due

    @pytest.mark.parametrize("after", ["acknowledged", "resolved"])
    def test_no_escalation_once_acknowledged_or_resolved(self, after: str) -> None:
        book = self.book_with(alert(1, severity="critical"))
        if after == "acknowledged":
            book.add_ack(ack("alert-1", 1))
        else:
            book.add_alert(raw(alert(2, severity="critical", status="resolved")))
        jobs, next_due = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0 + 10 * HOUR)
        assert ([], None) == ([j for j in jobs if j.kind == "escalation"], next_due)

    def test_high_severity_never_escalates(self) -> None:
        book = self.book_with(alert(1, severity="high"))
        jobs, next_due = owed(book.alerts["alert-1"], PRIMARY, ESCALATION, HOUR, T0 + 100 * HOUR)
        assert (set(), None) == ({j.kind for j in jobs} - {"alert"}, next_due)

    def test_delivery_ids_are_stable_and_distinct(self) -> None:
        """A restarted notifier must recognise what another worker delivered."""
        a, _b = PRIMARY
        assert delivery_id("x", 1, "alert", a) == delivery_id("x", 1, "alert", Receiver("primary", a.url))
        ids = {delivery_id("x", rev, kind, r) for rev in (1, 2) for kind in ("alert", "escalation") for r in PRIMARY}
        assert 8 == len(ids)

    def test_signature_is_hmac_sha256_of_the_exact_body(self) -> None:
        import hashlib
        import hmac

        body = raw(alert(1))
        expected = "sha256=" + hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
        assert expected == sign(b"k3y", body)
        assert verify(b"k3y", body, sign(b"k3y", body))
        assert not verify(b"k3y", body + b" ", sign(b"k3y", body))
        assert not verify(b"other", body, sign(b"k3y", body))

    def test_backoff_doubles_up_to_the_cap(self) -> None:
        assert [1.0, 2.0, 4.0, 8.0, 10.0, 10.0] == [backoff_s(n, 1.0, 10.0) for n in range(1, 7)]


class FakePublisher:
    """Records what would have gone to Kafka; can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = False

    async def __call__(self, topic: str, key: bytes, value: bytes) -> None:
        if self.fail:
            raise ConnectionError("broker unavailable")
        self.sent.append((topic, key, value))


@pytest.fixture
def api_parts(apply_all: ApplyAll, make: EventFactory) -> tuple[DsmbApi, DsmbFeed, FakePublisher, list[AlertMessage]]:
    """An API over books fed with the engine's real output for a subject with arm-revealing alerts too."""
    fraction = {
        "event_id": "TW-101-tr1",
        "subject_id": "TW-101",
        "site_id": "SITE-GZ",
        "occurred_at": "2025-03-03T09:00:00+08:00",
        "kind": "sbrt_fraction",
        "fraction": 1,
        "dose_gy": 8.0,
    }
    crossover = decode(TREATMENT, json.dumps(fraction).encode())
    assert not isinstance(crossover, Rejection)
    alerts = apply_all(
        [
            make.enrollment(subject_id="TW-101", event_id="TW-101-enr", arm="control", child_pugh_score=9),
            make.lab(subject_id="TW-101", event_id="TW-101-l1", analyte="platelets", value=40.0, day=1),
            make.lab(subject_id="TW-101", event_id="TW-101-l2", analyte="platelets", value=20.0, day=2),
            crossover,
            make.ae(subject_id="TW-101", event_id="TW-101-ae1", grade=4, serious=True, term="Diarrhea", day=3),
        ]
    )
    assert any(reveals_arm(a.rule) for a in alerts), "the scenario must include an arm-revealing alert"
    feed = feed_of(alerts)
    feed.caught_up.set()
    publisher = FakePublisher()
    tokens = {Role.DSMB: SecretStr(DSMB_TOKEN), Role.MASKED: SecretStr(MASKED_TOKEN)}
    api = DsmbApi(feed, publisher, Metrics(_registry()), tokens, clock=lambda: T0 + 2 * HOUR)
    return api, feed, publisher, alerts


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def ack_body(api: DsmbApi, alert_id: str, **fields: Any) -> bytes:
    """An acknowledgement of the alert's current state, as the page sends it."""
    history = api.feed.dsmb.get(alert_id)
    revision = history.current.revision if history is not None else 1
    return json.dumps({"revision": revision, **fields}).encode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


class TestApiAccess:
    @pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", f"Basic {DSMB_TOKEN}", DSMB_TOKEN])
    def test_missing_or_malformed_token_is_401_with_a_challenge(self, api_parts: Any, header: str | None) -> None:
        api = api_parts[0]
        reply = _reply(lambda: api.list_alerts(header, {}))
        assert (401, "Bearer") == (reply.status, reply.headers.get("WWW-Authenticate", "").split(" ")[0])

    def test_unknown_token_is_401(self, api_parts: Any) -> None:
        assert 401 == _reply(lambda: api_parts[0].list_alerts(bearer(DSMB_TOKEN + "x"), {})).status

    @pytest.mark.parametrize("endpoint", ["list", "detail", "ack"])
    def test_masked_role_on_dsmb_endpoints_is_403(self, api_parts: Any, endpoint: str) -> None:
        api, _, publisher, alerts = api_parts
        auth = bearer(MASKED_TOKEN)
        calls = {
            "list": lambda: api.list_alerts(auth, {}),
            "detail": lambda: api.get_alert(auth, alerts[0].alert_id),
            "ack": lambda: asyncio.run(
                api.ack(auth, alerts[0].alert_id, body_of(ack_body(api, alerts[0].alert_id, acknowledged_by="x")))
            ),
        }
        assert 403 == _reply(calls[endpoint]).status
        assert [] == publisher.sent

    def test_no_configured_tokens_lock_everything(self, api_parts: Any) -> None:
        _, feed, publisher, _ = api_parts
        locked = DsmbApi(feed, publisher, Metrics(_registry()), {Role.DSMB: None, Role.MASKED: None})
        assert 401 == _reply(lambda: locked.list_alerts("Bearer ", {})).status
        assert 401 == _reply(lambda: locked.list_masked("Bearer None", {})).status

    def test_until_the_books_are_read_the_answer_is_503_not_an_empty_list(self, api_parts: Any) -> None:
        api, feed, _, _ = api_parts
        feed.caught_up.clear()
        reply = _reply(lambda: api.list_alerts(bearer(DSMB_TOKEN), {}))
        assert (503, "5") == (reply.status, reply.headers.get("Retry-After"))
        assert 401 == _reply(lambda: api.list_alerts(None, {})).status

    def test_dsmb_may_read_the_masked_view(self, api_parts: Any) -> None:
        assert 200 == _reply(lambda: api_parts[0].list_masked(bearer(DSMB_TOKEN), {})).status


def _reply(call: Any) -> Any:
    from trialwatch.dsmb.api import Denied

    try:
        return call()
    except Denied as denied:
        return denied.reply


class TestApiContent:
    def test_list_holds_each_alert_once_in_its_current_state(self, api_parts: Any) -> None:
        api, _, _, alerts = api_parts
        body = api.list_alerts(bearer(DSMB_TOKEN), {}).body
        latest: dict[str, AlertMessage] = {}
        for a in alerts:
            latest[a.alert_id] = a
        assert {(a.alert_id, a.revision, a.status) for a in latest.values()} == {
            (a["alert_id"], a["revision"], a["status"]) for a in body["alerts"]
        }
        assert body["count"] == len(latest)

    def test_filters(self, api_parts: Any) -> None:
        api, _, _, alerts = api_parts
        body = api.list_alerts(bearer(DSMB_TOKEN), {"rule": "lab.platelets.low", "subject_id": "TW-101"}).body
        expected = {a.alert_id for a in alerts if a.rule == "lab.platelets.low"}
        assert expected == {a["alert_id"] for a in body["alerts"]}
        assert expected
        assert 0 == api.list_alerts(bearer(DSMB_TOKEN), {"site_id": "SITE-NOWHERE"}).body["count"]
        assert 400 == api.list_alerts(bearer(DSMB_TOKEN), {"arm": "sbrt"}).status

    def test_detail_has_every_revision(self, api_parts: Any) -> None:
        api, _, _, alerts = api_parts
        platelets = [a for a in alerts if a.rule == "lab.platelets.low"]
        assert len(platelets) >= 2, "the scenario must produce a platelet alert with two states"
        body = api.get_alert(bearer(DSMB_TOKEN), platelets[0].alert_id).body
        assert [a.revision for a in platelets] == [r["revision"] for r in body["revisions"]]

    def test_unknown_alert_is_404(self, api_parts: Any) -> None:
        api = api_parts[0]
        assert 404 == api.get_alert(bearer(DSMB_TOKEN), "no-such-alert").status
        assert 404 == api.get_masked(bearer(MASKED_TOKEN), "no-such-alert").status

    def test_masked_view_never_shows_the_arm_or_an_arm_revealing_rule(self, api_parts: Any) -> None:
        api, _, _, alerts = api_parts
        listed = api.list_masked(bearer(MASKED_TOKEN), {}).body
        text = json.dumps(listed)
        assert '"arm"' not in text
        assert not [a for a in listed["alerts"] if reveals_arm(a["rule"])]
        assert listed["count"] == len({a.alert_id for a in alerts if not reveals_arm(a.rule)})
        for a in alerts:
            detail = api.get_masked(bearer(MASKED_TOKEN), a.alert_id)
            if reveals_arm(a.rule):
                assert 404 == detail.status, a.rule
            else:
                assert '"arm"' not in json.dumps(detail.body)
        by_rule = api.list_masked(bearer(MASKED_TOKEN), {"rule": "eligibility.violation,sbrt.window.missed"}).body
        assert not [a for a in by_rule["alerts"] if reveals_arm(a["rule"])]


class TestAcknowledge:
    def test_ack_is_written_to_the_ack_topic_and_shown(self, api_parts: Any) -> None:
        api, _feed, publisher, alerts = api_parts
        target = alerts[0]
        reply = asyncio.run(
            api.ack(
                bearer(DSMB_TOKEN),
                target.alert_id,
                body_of(ack_body(api, target.alert_id, acknowledged_by="Dr Lin", comment="seen")),
            )
        )
        assert 201 == reply.status
        [(topic, key, value)] = publisher.sent
        written = AlertAck.model_validate_json(value)
        assert (ALERT_ACKS, target.alert_id.encode()) == (topic, key)
        assert ("Dr Lin", "seen", target.alert_id) == (written.acknowledged_by, written.comment, written.alert_id)
        shown = api.get_alert(bearer(DSMB_TOKEN), target.alert_id).body["alert"]["acknowledgement"]
        assert written.ack_id == shown["ack_id"]

    def test_acknowledging_twice_writes_once_and_returns_the_first(self, api_parts: Any) -> None:
        api, _, publisher, alerts = api_parts
        first_body = body_of(ack_body(api, alerts[0].alert_id, acknowledged_by="Dr Lin"))
        first = asyncio.run(api.ack(bearer(DSMB_TOKEN), alerts[0].alert_id, first_body))
        again_body = body_of(ack_body(api, alerts[0].alert_id, acknowledged_by="Dr Wu"))
        again = asyncio.run(api.ack(bearer(DSMB_TOKEN), alerts[0].alert_id, again_body))
        assert (201, 200) == (first.status, again.status)
        assert "Dr Lin" == again.body["acknowledgement"]["acknowledged_by"]
        assert 1 == len(publisher.sent)

    def test_unknown_alert_is_404_and_nothing_is_written(self, api_parts: Any) -> None:
        api, _, publisher, _ = api_parts
        reply = asyncio.run(
            api.ack(bearer(DSMB_TOKEN), "no-such-alert", body_of(b'{"revision": 1, "acknowledged_by": "Dr Lin"}'))
        )
        assert (404, []) == (reply.status, publisher.sent)

    @pytest.mark.parametrize(
        "body",
        [
            b"",
            b"{}",
            b'{"revision": 1, "acknowledged_by": ""}',
            b'{"revision": 1, "acknowledged_by": "   "}',
            b'{"acknowledged_by": "no revision"}',
            b"not json",
            b'{"revision": 1, "acknowledged_by": "x", "extra": 1}',
        ],
    )
    def test_bad_body_is_400(self, api_parts: Any, body: bytes) -> None:
        api, _, publisher, alerts = api_parts
        reply = asyncio.run(api.ack(bearer(DSMB_TOKEN), alerts[0].alert_id, body_of(body)))
        assert (400, []) == (reply.status, publisher.sent)

    def test_a_state_the_member_did_not_see_is_not_acknowledged(self, api_parts: Any) -> None:
        """The page showed revision 1 (high); revision 2 (critical) arrived: acknowledging 1 must not silence 2."""
        api, _, publisher, alerts = api_parts
        platelets = [a for a in alerts if a.rule == "lab.platelets.low"]
        assert [1, 2] == [a.revision for a in platelets][:2]
        stale = json.dumps({"revision": 1, "acknowledged_by": "Dr Lin"}).encode()
        reply = asyncio.run(api.ack(bearer(DSMB_TOKEN), platelets[0].alert_id, body_of(stale)))
        assert (409, []) == (reply.status, publisher.sent)
        assert "revision 2" in reply.body["error"]

    def test_an_alert_whose_firing_states_were_compacted_away_is_409_not_a_crash(self) -> None:
        feed = DsmbFeed(["unused:9092"], "ledger")
        feed.caught_up.set()
        feed.dsmb.add_alert(raw(alert(3, status="resolved")))
        api = DsmbApi(feed, FakePublisher(), Metrics(_registry()), {Role.DSMB: SecretStr(DSMB_TOKEN)})
        body = json.dumps({"revision": 3, "acknowledged_by": "Dr Lin"}).encode()
        assert 409 == asyncio.run(api.ack(bearer(DSMB_TOKEN), "alert-1", body_of(body))).status

    def test_a_wrong_record_on_the_masked_topic_is_not_served(self, api_parts: Any) -> None:
        api, feed, _, _ = api_parts
        leaked = alert(1, alert_id="leak", rule="sbrt.window.missed")
        feed.masked.add_alert(leaked.model_dump_json(exclude={"arm"}).encode())
        assert 404 == api.get_masked(bearer(MASKED_TOKEN), "leak").status
        listed = api.list_masked(bearer(MASKED_TOKEN), {}).body["alerts"]
        assert "leak" not in {a["alert_id"] for a in listed}

    def test_kafka_failure_is_not_an_acknowledgement(self, api_parts: Any) -> None:
        """The ack exists once it is in the audit trail; a failed write leaves the alert unacknowledged."""
        api, feed, publisher, alerts = api_parts
        publisher.fail = True
        with pytest.raises(ConnectionError):
            asyncio.run(
                api.ack(
                    bearer(DSMB_TOKEN),
                    alerts[0].alert_id,
                    body_of(ack_body(api, alerts[0].alert_id, acknowledged_by="Dr Lin")),
                )
            )
        history = feed.dsmb.get(alerts[0].alert_id)
        assert history is not None
        assert history.acknowledgement is None


class TestSettings:
    def test_webhook_urls_need_a_secret(self) -> None:
        with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
            Settings(webhook_urls=["http://dsmb.example/hook"])

    def test_urls_from_the_environment_are_comma_separated(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRIALWATCH_WEBHOOK_URLS", "http://a.example/x, https://b.example/y")
        monkeypatch.setenv("TRIALWATCH_WEBHOOK_SECRET", "k")
        assert ["http://a.example/x", "https://b.example/y"] == Settings().webhook_urls

    def test_non_http_url_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="http"):
            Settings(webhook_urls=["ftp://x"], webhook_secret=SecretStr("k"))

    @pytest.mark.parametrize("blank", ["", "   "])
    def test_a_blank_token_is_no_token(self, monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
        """`TRIALWATCH_DSMB_TOKEN=` (compose, ConfigMap) must not make the empty string a password."""
        monkeypatch.setenv("TRIALWATCH_DSMB_TOKEN", blank)
        monkeypatch.setenv("TRIALWATCH_WEBHOOK_SECRET", blank)
        settings = Settings()
        assert (None, None) == (settings.dsmb_token, settings.webhook_secret)

    def test_tokens_do_not_print(self) -> None:
        settings = Settings(dsmb_token=SecretStr(DSMB_TOKEN), masked_token=SecretStr(MASKED_TOKEN))
        assert DSMB_TOKEN not in repr(settings)
        assert MASKED_TOKEN not in str(settings)


# ---------------------------------------------------------------------------
# Defect 10 of issue 10: the API as an attacker meets it.

READ_TIMEOUT_S = 0.5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def served(api_parts: Any) -> Any:
    """The real views of dsmb/web.py on Faust's aiohttp server (no Kafka), on a free port."""
    import faust

    from trialwatch.dsmb import web as dsmb_web

    port = _free_port()
    app = faust.App(f"dsmb-web-{port}", broker="kafka://127.0.0.1:1", web_bind="127.0.0.1", web_port=port)
    dsmb_web.register(app, api_parts[0], read_timeout_s=READ_TIMEOUT_S)
    await app.web.start_server()
    try:
        yield port
    finally:
        await app.web.stop_server()


async def _status_of(port: int, request: bytes, timeout_s: float = 2.0) -> int:
    """Send `request` as raw bytes (possibly announcing a body it never sends); the status the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        return int(line.split()[1])
    finally:
        writer.close()


def _post_ack(authorization: str | None, length: int, alert_id: str = "alert-x") -> bytes:
    auth = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    return f"POST /alerts/{alert_id}/ack HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {length}\r\n\r\n".encode()


class TestApiUnderAttack:
    @pytest.mark.parametrize(
        ("authorization", "status"),
        [(None, 401), (f"Bearer {DSMB_TOKEN}x", 401), (f"Bearer {MASKED_TOKEN}", 403)],
        ids=["no-token", "wrong-token", "masked-token"],
    )
    async def test_without_a_dsmb_token_the_body_is_never_waited_for(
        self, served: int, authorization: str | None, status: int
    ) -> None:
        """A caller without the DSMB token announces 1 MiB and sends none of it: answered at once, not read."""
        assert status == await _status_of(served, _post_ack(authorization, 1024 * 1024 - 1))

    @pytest.mark.parametrize("authorization", [None, f"Bearer {DSMB_TOKEN}x", f"Bearer {MASKED_TOKEN}"])
    def test_the_body_reader_is_not_called_before_the_token_is_checked(
        self, api_parts: Any, authorization: str | None
    ) -> None:
        api, _, publisher, alerts = api_parts
        calls: list[int] = []

        async def reader(limit: int) -> bytes:
            calls.append(limit)
            return b'{"revision": 1, "acknowledged_by": "x"}'

        assert _reply(lambda: asyncio.run(api.ack(authorization, alerts[0].alert_id, reader))).status in (401, 403)
        assert ([], []) == (calls, publisher.sent)

    async def test_an_ack_body_past_the_limit_is_413_without_reading_it(self, served: int) -> None:
        assert 413 == await _status_of(served, _post_ack(bearer(DSMB_TOKEN), 64 * 1024))

    async def test_a_chunked_ack_body_past_the_limit_is_413(self, served: int) -> None:
        head = _post_ack(bearer(DSMB_TOKEN), 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        assert 413 == await _status_of(served, head + chunk * 4)

    async def test_a_body_that_stops_arriving_is_408(self, served: int) -> None:
        request = _post_ack(bearer(DSMB_TOKEN), 100) + b'{"revision": 1,'
        assert 408 == await _status_of(served, request, timeout_s=READ_TIMEOUT_S + 2)

    async def test_a_connection_that_never_completes_its_headers_is_closed(self, served: int) -> None:
        """Slowloris: a partial request line held open. aiohttp's own default kept it for 3630 s."""
        reader, writer = await asyncio.open_connection("127.0.0.1", served)
        try:
            writer.write(b"GET /alerts HTT")
            await writer.drain()
            assert b"" == await asyncio.wait_for(reader.read(), READ_TIMEOUT_S + 2), "closed without an answer"
        finally:
            writer.close()

    async def test_headers_trickled_byte_by_byte_do_not_extend_the_time(self, served: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for byte in b"GET /alerts HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 1000:
                if reader.at_eof() or loop.time() - started > READ_TIMEOUT_S + 2:
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                    await writer.drain()
                await asyncio.sleep(0.05)
            assert reader.at_eof(), "still open while the headers trickle in"
            assert loop.time() - started < READ_TIMEOUT_S + 1
        finally:
            writer.close()

    async def test_a_token_that_is_not_utf8_is_401_not_a_crash(self, served: int) -> None:
        """aiohttp hands undecodable header bytes over as surrogates; found by the fuzz suite (500 before)."""
        request = (
            b"GET /alerts HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe" + DSMB_TOKEN.encode() + b"\r\n\r\n"
        )
        assert 401 == await _status_of(served, request)

    @pytest.mark.parametrize("revision", ['"1"', "1.0", "true", "1e0", "[1]"])
    def test_revision_is_a_json_integer_only(self, api_parts: Any, revision: str) -> None:
        api, feed, publisher, _ = api_parts
        [target] = [h.current.alert_id for h in feed.dsmb.alerts.values() if h.current.revision == 1][:1]
        body = f'{{"revision": {revision}, "acknowledged_by": "Dr Lin"}}'.encode()
        reply = asyncio.run(api.ack(bearer(DSMB_TOKEN), target, body_of(body)))
        assert (400, []) == (reply.status, publisher.sent)
        valid = body_of(body.replace(revision.encode(), b"1"))
        assert 201 == asyncio.run(api.ack(bearer(DSMB_TOKEN), target, valid)).status

    @pytest.mark.parametrize(
        "body",
        [
            b'{"revision": 2, "revision": 1, "acknowledged_by": "Dr Lin"}',
            b'{"revision": 1, "acknowledged_by": "Dr\\u0000Lin"}',
            b'{"revision": 1, "acknowledged_by": "Dr \\ud800"}',
            b'{"revision": 1, "acknowledged_by": "Dr Lin", "comment": "\\u001b[31m"}',
        ],
        ids=["duplicate-key", "nul", "lone-surrogate", "escape-sequence"],
    )
    def test_an_ack_the_audit_trail_could_not_hold_as_meant_is_400(self, api_parts: Any, body: bytes) -> None:
        api, feed, publisher, _ = api_parts
        [target] = [h.current.alert_id for h in feed.dsmb.alerts.values() if h.current.revision == 1][:1]
        reply = asyncio.run(api.ack(bearer(DSMB_TOKEN), target, body_of(body)))
        assert (400, []) == (reply.status, publisher.sent)

    def test_a_comment_may_have_lines(self, api_parts: Any) -> None:
        api, feed, _, _ = api_parts
        [target] = [h.current.alert_id for h in feed.dsmb.alerts.values() if h.current.revision == 1][:1]
        body = b'{"revision": 1, "acknowledged_by": "Dr Lin", "comment": "seen\\n\\tcalled the site"}'
        assert 201 == asyncio.run(api.ack(bearer(DSMB_TOKEN), target, body_of(body))).status

    def test_one_token_for_two_roles_is_refused(self, api_parts: Any) -> None:
        _, feed, publisher, _ = api_parts
        with pytest.raises(ValueError, match="own"):
            DsmbApi(feed, publisher, Metrics(_registry()), {r: SecretStr(DSMB_TOKEN) for r in Role})


class TestTokenSettings:
    @pytest.mark.parametrize("field", ["dsmb_token", "masked_token"])
    @pytest.mark.parametrize("token", ["K3", "dsmb-token-7f3a", "0123456789abcdef0123456789abcde"])
    def test_a_token_too_short_to_be_a_secret_is_refused_at_start(self, field: str, token: str) -> None:
        with pytest.raises(ValidationError, match="at least 32 characters") as refused:
            Settings(**{field: SecretStr(token)})
        assert token not in str(refused.value), "the refusal must not print the token"

    def test_a_short_token_from_the_environment_is_refused_without_printing_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TRIALWATCH_DSMB_TOKEN", "hunter2-hunter2")
        with pytest.raises(ValidationError, match="TRIALWATCH_DSMB_TOKEN has 15 characters") as refused:
            Settings()
        assert "hunter2" not in str(refused.value)

    def test_the_same_token_for_both_roles_is_refused_at_start(self) -> None:
        token = SecretStr("0123456789abcdef0123456789abcdef01234567")
        with pytest.raises(ValidationError, match="the same token") as refused:
            Settings(dsmb_token=token, masked_token=token)
        assert token.get_secret_value() not in str(refused.value)

    @pytest.mark.parametrize("token", [" " + "a" * 40, "a" * 20 + " " + "a" * 20, "a" * 40 + "\x00", "é" * 40])
    def test_a_token_no_header_could_carry_is_refused(self, token: str) -> None:
        with pytest.raises(ValidationError, match="printable"):
            Settings(dsmb_token=SecretStr(token))

    def test_long_distinct_tokens_are_accepted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRIALWATCH_DSMB_TOKEN", "d" * 32)
        monkeypatch.setenv("TRIALWATCH_MASKED_TOKEN", "m" * 64)
        settings = Settings()
        assert settings.dsmb_token is not None
        assert settings.masked_token is not None
        assert ("d" * 32, "m" * 64) == (
            settings.dsmb_token.get_secret_value(),
            settings.masked_token.get_secret_value(),
        )
