"""A headless Chromium driven over the Chrome DevTools Protocol, for the browser tests.

Chromium (Debian's `chromium`, or CHROMIUM_PATH) starts with --remote-debugging-port=0 in a fresh profile;
the test talks to one page target over a websocket (aiohttp, which ComfyUI already needs). The asyncio loop
runs on a background thread so the tests stay plain synchronous functions: `page.call(method, **params)`,
`page.evaluate(js)`, `page.wait_for(js)`, `page.click(x, y)`, `page.screenshot(path)`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
START_TIMEOUT = 60.0


class BrowserError(AssertionError):
    """The page threw, a wait timed out, or Chromium failed; the message carries the page's console."""


def find_chromium() -> str | None:
    """The Chromium executable to use (CHROMIUM_PATH, else the first on PATH), or None."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)


class Page:
    """One page target: CDP calls, JavaScript evaluation, waits, mouse input, screenshots, console log."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Any, ws: Any):
        self._loop = loop
        self._session = session
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), loop)

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(f"[{data['params'].get('type')}] {text}")
            elif data.get("method") == "Page.javascriptDialogOpening":  # alert/confirm would block the page
                self.console.append(f"[dialog accepted] {data['params'].get('message')}")
                asyncio.ensure_future(self._call("Page.handleJavaScriptDialog", {"accept": True}))
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console.append(f"[exception] {details.get('exception', {}).get('description', details)}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def _call(self, method: str, params: dict) -> dict:
        call_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[call_id] = future
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        return await future

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict:
        """One CDP command; its result, or BrowserError with the protocol's error."""
        answer = asyncio.run_coroutine_threadsafe(self._call(method, params), self._loop).result(timeout)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}\n{self.console_tail()}")
        return answer.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The JSON value of a JavaScript expression (promises awaited); BrowserError if it throws."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript threw: {text}\nin: {expression[:500]}\n{self.console_tail()}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "", interval: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or BrowserError naming `what`."""
        end = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < end:
            last = self.evaluate(expression)
            if last:
                return last
            time.sleep(interval)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what or expression} (last value: "
                           f"{last!r})\n{self.console_tail()}")

    def click(self, x: float, y: float) -> None:
        """A real left click (mouse moved, pressed, released) at page coordinates."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_element(self, selector: str) -> None:
        """Click the centre of the first element matching a CSS selector."""
        box = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2, r.width, r.height];
        }})()""")
        if not box or not box[2] or not box[3]:
            raise BrowserError(f"nothing visible to click at {selector!r} (box {box})\n{self.console_tail()}")
        self.click(box[0], box[1])

    def screenshot(self, path: Path, clip: dict | None = None) -> bytes:
        """A PNG of the viewport (or a clip {x, y, width, height}), written to path."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def console_tail(self, lines: int = 30) -> str:
        return "--- browser console (last lines) ---\n" + "\n".join(self.console[-lines:])


class Browser:
    """A headless Chromium process with one page, closed by close() (also on failure)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="zit-chromium-")
        cmd = [executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
               f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cdp", daemon=True)
        self.thread.start()
        self.session: Any = None
        self.page: Page | None = None
        try:
            port = self._devtools_port()
            opening = asyncio.run_coroutine_threadsafe(self._open_page(port), self.loop)
            self.page = opening.result(START_TIMEOUT)
            for domain in ("Page", "Runtime"):
                self.page.call(f"{domain}.enable")
            self.page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                           deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        end = time.monotonic() + START_TIMEOUT
        seen = []
        assert self.proc.stderr is not None
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                threading.Thread(target=self._drain, daemon=True).start()
                return int(m[1])
        raise BrowserError(f"Chromium did not open its DevTools port:\n{''.join(seen)[-3000:]}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    async def _open_page(self, port: int) -> Page:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json(content_type=None)
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            async with self.session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
                page = await r.json(content_type=None)
        ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return Page(self.loop, self.session, ws)

    def close(self) -> None:
        async def shutdown() -> None:
            if self.page is not None:
                await self.page._ws.close()
            if self.session is not None:
                await self.session.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
