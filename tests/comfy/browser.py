"""Headless Chromium driven over the DevTools protocol, for the real-browser tests.

It needs nothing beyond ComfyUI's own venv: the protocol's websocket is spoken with aiohttp (a
ComfyUI dependency), and Chromium is Debian's `chromium` package. Chromium starts with the flags
this machine needs (no sandbox as root, no background networking, a fresh profile) and is stopped
by its own PID. Console errors, uncaught exceptions and failed loads are collected for the tests.

    with Browser() as b:
        b.open("http://127.0.0.1:8188/")
        b.wait_for("!!window.app?.graph")
        b.eval("app.graph.nodes.length")
        b.screenshot(path)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, width: int = 1600, height: int = 1000, start_timeout: float = 60):
        chromium = find_chromium()
        if not chromium:
            raise BrowserError("Chromium is not installed: apt-get install -y chromium")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="dco-chromium-")
        self.console: list[dict[str, Any]] = []
        cmd = [chromium, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
               f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        try:
            port = self._devtools_port(start_timeout)
            page = self._page_target(port, start_timeout)
            self._run(self._connect(page["webSocketDebuggerUrl"]), 30)
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def _devtools_port(self, timeout: float) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited during start-up with status {self.proc.returncode}.")
            if marker.is_file():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise BrowserError(f"Chromium did not open its DevTools port within {timeout} s.")

    def _page_target(self, port: int, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]
            time.sleep(0.1)
        raise BrowserError("Chromium has no page to drive.")

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, url: str) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientWSTimeout(ws_close=30) if hasattr(aiohttp, "ClientWSTimeout") else 30
        self._ws = await self._session.ws_connect(url, max_msg_size=0, timeout=timeout)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.console.append({"level": params.get("type"), "text": text, "url": frame[0].get("url", "")})
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            self.console.append({"level": "exception", "text": text, "url": d.get("url", "")})
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append({"level": e.get("level"), "text": e.get("text", ""), "url": e.get("url", "")})

    async def _send(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut = self._loop.create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await fut

    def send(self, method: str, wait: float = 60, **params: Any) -> dict[str, Any]:
        reply = self._run(self._send(method, params), wait)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    # ------------------------------------------------------------------ the page
    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def eval(self, expression: str, timeout: float = 60) -> Any:
        """Evaluate a JS expression (promises are awaited) and return its JSON value."""
        result = self.send("Runtime.evaluate", wait=timeout + 5, expression=expression, awaitPromise=True,
                           returnByValue=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError(f"JS failed: {(d.get('exception') or {}).get('description') or d.get('text')}\n"
                               f"in: {expression[:500]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.2) -> Any:
        """Poll until `expression` is truthy; returns its value."""
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            try:
                value = self.eval(expression)
                if value:
                    return value
            except BrowserError as exc:
                last_error = exc
            time.sleep(interval)
        raise BrowserError(f"Timed out after {timeout} s waiting for: {expression}"
                           + (f" (last error: {last_error})" if last_error else ""))

    def screenshot_bytes(self, clip: tuple[float, float, float, float] | None = None) -> bytes:
        """A PNG of the viewport, or of `clip` = (x, y, width, height) in page pixels."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            x, y, w, h = clip
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])

    def screenshot(self, path: str | os.PathLike, clip: tuple[float, float, float, float] | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.screenshot_bytes(clip))
        return path

    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.console if m["level"] in ("error", "exception", "assert")]

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        try:
            if getattr(self, "_ws", None) is not None:
                async def shut() -> None:
                    await self._ws.close()
                    await self._session.close()
                try:
                    self._run(shut(), 10)
                except Exception:  # noqa: BLE001 - the browser is going away anyway
                    pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
