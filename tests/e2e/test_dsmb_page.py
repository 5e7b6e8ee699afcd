"""The DSMB page in a real (headless Chromium) browser against a live worker: sign in, see the alert, acknowledge it."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from tests.e2e.browser import Browser
from tests.e2e.conftest import enrollment, lab, publish, read_topic, wait_consumed

pytestmark = pytest.mark.e2e

SIGN_IN = "#login button[type=submit]"


async def api_get(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        body: dict[str, Any] = await resp.json(content_type=None)
        return resp.status, body


async def listed_alerts(url: str, token: str, subject: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The alerts the API lists for `subject`, once there is at least one."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = await api_get(f"{url}/alerts?subject_id={subject}", token)
        if status == 200 and body["alerts"]:
            alerts: list[dict[str, Any]] = body["alerts"]
            return alerts
        await asyncio.sleep(0.3)
    raise TimeoutError(f"the API never listed an alert for {subject}; last answer {body}")


def card(alert_id: str) -> str:
    return f"#list article.alert[data-alert-id={json.dumps(alert_id)}]"


class TestDsmbPage:
    """A DSMB member signs in, finds the alert under Open and acknowledges it; it is then on the page, API and topic."""

    async def test_sign_in_see_and_acknowledge_an_alert(
        self, bootstrap: str, worker_factory: Any, producer: AIOKafkaProducer, subject_prefix: str
    ) -> None:
        token = secrets.token_urlsafe(24)
        worker = worker_factory(TRIALWATCH_DSMB_TOKEN=token)
        worker.start()
        subject = f"{subject_prefix}-page"
        await publish(producer, [enrollment(subject, "sbrt")])
        await wait_consumed(bootstrap, worker.app_id, "trial.enrollment.v1")
        await publish(producer, [lab(subject, f"{subject}-l1", 20, at="2025-03-02T08:00:00+08:00")])
        [alert] = await listed_alerts(worker.url, token, subject)
        assert ("lab.platelets.low", "critical", "firing", None) == (
            alert["rule"],
            alert["severity"],
            alert["status"],
            alert["acknowledgement"],
        )
        alert_id = alert["alert_id"]
        mine = card(alert_id)
        who, comment = "Dr Page E2E", "seen in the browser test"

        async with Browser.launch() as page:
            await page.navigate(f"{worker.url}/")
            assert "trialwatch · DSMB alerts" == await page.evaluate("document.title")

            # Not signed in: no alert data at all.
            await page.wait_for("document.querySelector('#list .empty') !== null", what="the empty list")
            assert "Sign in with your DSMB token." == await page.text("#status")
            assert 0 == await page.count("article.alert")
            assert alert["summary"] not in (await page.text("body") or "")

            # A wrong token is refused and shows nothing either.
            await page.type("#token", f"wrong-{token}")
            await page.click(SIGN_IN)
            await page.wait_for(
                "document.getElementById('status').className === 'error'", what="the status to show an error"
            )
            assert "That token was not accepted." == await page.text("#status")
            assert 0 == await page.count("article.alert")
            assert ("0", "0") == (await page.text("#count-open"), await page.text("#count-resolved"))
            assert alert["summary"] not in (await page.text("body") or "")

            # The right token lists the alert under Open, unacknowledged.
            await page.type("#token", token)
            await page.click(SIGN_IN)
            await page.wait_for(f"document.querySelector({json.dumps(mine)}) !== null", what=f"the card of {alert_id}")
            assert "" == await page.evaluate("document.getElementById('token').value"), "the token field is cleared"
            assert "true" == await page.evaluate("document.getElementById('tab-open').getAttribute('aria-selected')")
            assert await page.evaluate("Number(document.getElementById('count-open').textContent)") >= 1
            assert "firing" == await page.evaluate(f"document.querySelector({json.dumps(mine)}).dataset.status")
            assert alert["summary"] == await page.text(f"{mine} .summary")
            head = await page.text(f"{mine} > div") or ""
            assert subject in head
            assert "lab.platelets.low" in head
            assert "Not acknowledged" == await page.text(f"{mine} .ack-state")

            # Acknowledge it as a named DSMB member, with a comment.
            await page.type("#who", who)
            await page.type(f"{mine} .ack-form input", comment)
            await page.click(f"{mine} button.ack-button")
            state = await page.wait_for(
                f"""(() => {{
                    const s = document.querySelector({json.dumps(mine + " .ack-state")});
                    return s && s.textContent.startsWith("Acknowledged by ") ? s.textContent : null;
                }})()""",
                what="the card to show the acknowledgement",
            )
            assert state.startswith(f"Acknowledged by {who} at ")
            assert state.endswith(f" — {comment}")
            assert 0 == await page.count(f"{mine} .ack-form"), "an acknowledged card offers no second acknowledgement"
            assert "error" != await page.evaluate("document.getElementById('status').className")
            assert [] == page.page_errors

        # The API holds the acknowledgement...
        status, detail = await api_get(f"{worker.url}/alerts/{alert_id}", token)
        assert 200 == status
        assert (who, comment, 1) == (
            detail["alert"]["acknowledgement"]["acknowledged_by"],
            detail["alert"]["acknowledgement"]["comment"],
            detail["alert"]["acknowledgement"]["revision"],
        )
        assert [who] == [a["acknowledged_by"] for a in detail["acknowledgements"]]
        # ... and so does the audit trail in Kafka.
        acks = await read_topic(
            bootstrap, "trial.alert-acks.v1", lambda v: v.get("alert_id") == alert_id, lambda f: len(f) >= 1
        )
        assert [(who, comment, 1)] == [(a["acknowledged_by"], a["comment"], a["revision"]) for a in acks]
        # The API itself still refuses a caller without the token.
        assert 401 == (await api_get(f"{worker.url}/alerts/{alert_id}", None))[0]
