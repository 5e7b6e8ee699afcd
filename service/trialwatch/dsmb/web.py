"""The DSMB API and page on the worker's web server: thin Faust views over `DsmbApi`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import warnings
from importlib.resources import files
from typing import Any, cast

import faust
from aiohttp import web as aiohttp_web
from faust.exceptions import AlreadyConfiguredWarning
from faust.web import Request, Response, View

from trialwatch.dsmb.api import BodyReader, BodyRefused, Denied, DsmbApi, Reply

# How long a client may take to send a request's headers (from connecting, or
# from its previous answer) and, separately, an acknowledgement's body.
READ_TIMEOUT_S = 10.0

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


def close_slow_connections(app: faust.App, timeout_s: float) -> None:
    """Make the worker's aiohttp server drop a connection that has no complete request `timeout_s` after it opened.

    aiohttp has no header-read timeout, but its keep-alive timer starts when a
    connection opens and closes it if no complete request (request line and
    headers) has arrived when it fires; partial headers do not reset it. Its
    default is 3630 s, so a client sending a partial request line held the
    connection an hour. Faust passes `web_application_options` to aiohttp's
    `Application`, whose `handler_args` reach every connection's handler.
    """
    if "web" in vars(app):
        # The aiohttp Application exists already: the options would be ignored.
        raise RuntimeError("close_slow_connections must run before the Faust web server is created")
    options = dict(app.conf.web_application_options or {})
    options["handler_args"] = {**options.get("handler_args", {}), "keepalive_timeout": timeout_s}
    with warnings.catch_warnings():
        # Faust warns when a key is set after being read. Its only other reader
        # is the web driver, which does not exist yet (checked above).
        warnings.simplefilter("ignore", AlreadyConfiguredWarning)
        app.conf.web_application_options = options


def body_reader(request: Request, timeout_s: float) -> BodyReader:
    """Reads the body only when called (after the caller's token is checked), up to its limit, within `timeout_s`."""
    req = cast(aiohttp_web.Request, request)

    async def read(limit: int) -> bytes:
        if req.content_length is not None and req.content_length > limit:
            raise BodyRefused(413, f"the body is limited to {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await req.content.readany():
                    size += len(chunk)
                    if size > limit:  # chunked, or compressed: counted as it arrives
                        raise BodyRefused(413, f"the body is limited to {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyRefused(408, f"the body did not arrive within {timeout_s:g} s") from None
        except aiohttp_web.RequestPayloadError:
            raise BodyRefused(400, "the body could not be read (bad chunked or compressed encoding)") from None
        return b"".join(chunks)

    return read


def register(app: faust.App, api: DsmbApi, *, read_timeout_s: float = READ_TIMEOUT_S) -> None:
    """Mount `/`, `/alerts`, `/alerts/{alert_id}`, `/alerts/{alert_id}/ack` and the `/masked/alerts` view.

    Called before anything creates the app's web server (see `close_slow_connections`).
    """
    close_slow_connections(app, read_timeout_s)

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
            try:
                reply = await api.ack(auth(request), alert_id, body_reader(request, read_timeout_s))
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
