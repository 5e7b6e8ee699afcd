"""A small headless-Chromium driver over the Chrome DevTools Protocol, for the DSMB page tests.

No new dependency: Chromium is a subprocess, and CDP is spoken over the page
target's websocket with aiohttp (already installed for the service). Clicks
and typing go through CDP's Input domain, as a user's would, not through
`element.click()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REQUIRE_ENV = "TRIALWATCH_REQUIRE_BROWSER"


class BrowserError(Exception):
    """Chromium did not start, a CDP command failed, or page script threw."""


def chromium_binary() -> str:
    """Path of `chromium`; skips the test when it is missing, fails when TRIALWATCH_REQUIRE_BROWSER=1."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"chromium is not on PATH but {REQUIRE_ENV}=1 (`make chromium` installs it)")
        pytest.skip("no headless browser: install chromium (`make chromium`) or run `make test`")
    return found


class Browser:
    """One headless Chromium with one page, driven over CDP. Use `Browser.launch()` as an async context manager."""

    def __init__(self, proc: subprocess.Popen[bytes], profile: Path, log: Path) -> None:
        self._proc = proc
        self._profile = profile
        self._log = log
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        # Uncaught exceptions and console errors of the page, for failure messages.
        self.page_errors: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, timeout_s: float = 30.0) -> AsyncIterator[Browser]:
        binary = chromium_binary()
        profile = Path(tempfile.mkdtemp(prefix="trialwatch-chromium-"))
        log = profile.with_name(profile.name + ".log")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--window-size=1280,900",
                    # Port 0: Chromium picks a free port and writes it to DevToolsActivePort,
                    # so there is no race with another process taking a port we probed.
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, so shutdown also reaches the renderer and GPU helpers.
                start_new_session=True,
            )
        browser = cls(proc, profile, log)
        try:
            await browser._connect(timeout_s)
            yield browser
        finally:
            await browser.close()

    async def _connect(self, timeout_s: float) -> None:
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        self._session = aiohttp.ClientSession()
        ws_url: str | None = None
        last_error = "DevToolsActivePort never appeared"
        while ws_url is None:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"chromium's DevTools not reachable after {timeout_s}s ({last_error}):\n{self._log_tail()}"
                )
            try:
                port = int(port_file.read_text().splitlines()[0])
                async with self._session.get(
                    f"http://127.0.0.1:{port}/json", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    targets: list[dict[str, Any]] = await resp.json(content_type=None)
                pages = [t for t in targets if t.get("type") == "page" and "webSocketDebuggerUrl" in t]
                if pages:
                    ws_url = str(pages[0]["webSocketDebuggerUrl"])
                else:
                    last_error = f"no page target yet: {targets}"
            except (OSError, ValueError, IndexError, aiohttp.ClientError) as exc:
                last_error = repr(exc)
            if ws_url is None:
                await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(ws_url, max_msg_size=0, heartbeat=None)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data: dict[str, Any] = json.loads(msg.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        future.set_result(data)
                    continue
                self._on_event(data.get("method", ""), data.get("params", {}))
        finally:
            gone = BrowserError(f"the DevTools connection closed:\n{self._log_tail()}")
            for future in [*self._pending.values(), *(f for _, f in self._event_waiters)]:
                if not future.done():
                    future.set_exception(gone)
            self._pending.clear()
            self._event_waiters.clear()

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.page_errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
            self.page_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        for waiter in [w for w in self._event_waiters if w[0] == method]:
            self._event_waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(params)

    async def send(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one CDP command; its `result`, or BrowserError with CDP's error."""
        if self._ws is None or self._ws.closed:
            raise BrowserError("not connected to chromium")
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def _expect_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((method, future))
        return future

    async def navigate(self, url: str, timeout_s: float = 30.0) -> None:
        """Open `url` and wait for its load event."""
        loaded = self._expect_event("Page.loadEventFired")
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            loaded.cancel()
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")
        await asyncio.wait_for(loaded, timeout_s)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), as JSON-compatible data."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, userGesture=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script threw: {text}\n--- script ---\n{expression}")
        return result.get("result", {}).get("value")

    async def wait_for(self, predicate: str, timeout_s: float = 15.0, what: str | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or TimeoutError saying what the page showed."""
        deadline = time.monotonic() + timeout_s
        # Truthiness is JavaScript's: a DOM node or `{}` counts, though it comes back as a falsy `{}`.
        probe = f"Promise.resolve(({predicate})).then((v) => (v ? {{ok: true, value: v}} : {{ok: false}}))"
        while True:
            answer = await self.evaluate(probe)
            if answer["ok"]:
                return answer.get("value")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"page never satisfied {what or predicate!r} within {timeout_s}s; "
                    f"page text:\n{await self.text('body')}\npage errors: {self.page_errors}"
                )
            await asyncio.sleep(0.1)

    async def text(self, selector: str) -> str | None:
        """`innerText` of the first element matching a CSS selector, None when there is none."""
        value = await self.evaluate(f"document.querySelector({json.dumps(selector)})?.innerText ?? null")
        return None if value is None else str(value)

    async def count(self, selector: str) -> int:
        return int(await self.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))

    async def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first element matching `selector`, scrolled into view."""
        box = await self.evaluate(
            f"""(() => {{
                const e = document.querySelector({json.dumps(selector)});
                if (!e) return null;
                e.scrollIntoView({{block: "center", inline: "center"}});
                const r = e.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height}};
            }})()"""
        )
        if not box or not box["w"] or not box["h"]:
            raise BrowserError(f"nothing visible to click at {selector!r}: {box}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        """Focus the element matching `selector`, clear it and type `text` as keyboard input."""
        found = await self.evaluate(
            f"""(() => {{
                const e = document.querySelector({json.dumps(selector)});
                if (!e) return false;
                e.focus();
                e.select?.();
                return document.activeElement === e;
            }})()"""
        )
        if not found:
            raise BrowserError(f"nothing focusable at {selector!r}")
        await self.send("Input.insertText", text=text)

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no chromium log)"

    async def close(self) -> None:
        """Close the connection, kill Chromium and its helpers, remove the profile."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None:
            await self._session.close()
        # Until it is reaped, the browser's pid names its process group (it was started as the
        # leader of a new session), so this reaches the renderer and GPU helpers too.
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
        self._log.unlink(missing_ok=True)
