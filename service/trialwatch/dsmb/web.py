"""The DSMB API and page on the worker's web server: thin Faust views over `DsmbApi`."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from typing import Any

import faust
from faust.web import Request, Response, View

from trialwatch.dsmb.api import Denied, DsmbApi, Reply

PAGE = files("trialwatch.dsmb").joinpath("page.html").read_text(encoding="utf-8")


def _inline_hashes(page: str, tag: str) -> str:
    """CSP source list allowing exactly the page's own inline <script> or <style> blocks, by hash."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


# The page loads nothing from elsewhere and runs only its own inline script
# (pinned by hash, so an injected script would not run); API answers are data,
# never to be framed or sniffed.
_PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_inline_hashes(PAGE, 'script')}; "
    f"style-src {_inline_hashes(PAGE, 'style')}; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def register(app: faust.App, api: DsmbApi) -> None:
    """Mount `/`, `/alerts`, `/alerts/{alert_id}`, `/alerts/{alert_id}/ack` and the `/masked/alerts` view."""

    def answer(view: View, endpoint: str, call: Any) -> Response:
        try:
            reply: Reply = call()
        except Denied as denied:
            reply = denied.reply
        api.metrics.api_requests.labels(endpoint, str(reply.status)).inc()
        headers = {**_API_HEADERS, **reply.headers}
        return view.text(reply.text(), content_type="application/json", status=reply.status, headers=headers)

    def auth(request: Request) -> str | None:
        value: str | None = request.headers.get("Authorization")
        return value

    @app.page("/")
    class Page(View):
        async def get(self, request: Request) -> Response:
            api.metrics.api_requests.labels("page", "200").inc()
            return self.html(PAGE, headers=_PAGE_HEADERS)

    @app.page("/alerts")
    class Alerts(View):
        async def get(self, request: Request) -> Response:
            return answer(self, "alerts", lambda: api.list_alerts(auth(request), dict(request.query)))

    @app.page("/alerts/{alert_id}")
    class AlertDetail(View):
        async def get(self, request: Request, alert_id: str) -> Response:
            return answer(self, "alert", lambda: api.get_alert(auth(request), alert_id))

    @app.page("/alerts/{alert_id}/ack")
    class Acknowledge(View):
        async def post(self, request: Request, alert_id: str) -> Response:
            body = await request.read()
            try:
                reply = await api.ack(auth(request), alert_id, body)
            except Denied as denied:
                reply = denied.reply
            return answer(self, "ack", lambda: reply)

    @app.page("/masked/alerts")
    class MaskedAlerts(View):
        async def get(self, request: Request) -> Response:
            return answer(self, "masked_alerts", lambda: api.list_masked(auth(request), dict(request.query)))

    @app.page("/masked/alerts/{alert_id}")
    class MaskedAlertDetail(View):
        async def get(self, request: Request, alert_id: str) -> Response:
            return answer(self, "masked_alert", lambda: api.get_masked(auth(request), alert_id))
