"""A real headless browser for tests: Debian's chromium, driven over the DevTools protocol.

`Browser` starts chromium with a DevTools port it picks itself (port 0: chromium writes the
port it bound to `DevToolsActivePort` in its profile folder, no port is handed over), talks
to its first page over a websocket (aiohttp), and offers what the tests need: go to a URL,
read the page's text, take a screenshot. It never clicks. The process is stopped by `stop()`
(SIGTERM, then SIGKILL), which the fixture using it calls even after a failure.

The flags are the ones this machine's chromium needs to start headless as root without
reaching out to the network (background networking, component updates, sync, QUIC off).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.net import wait_until

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=900,640", "--remote-debugging-port=0",
         "--remote-allow-origins=*")


def chromium() -> str:
    """The chromium binary, or a clear failure (scripts/tools.sh installs it as root)."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        raise RuntimeError("chromium is not installed: scripts/test installs Debian's "
                           "`chromium` package when run as root (apt-get install chromium)")
    return found


class Browser:
    """One headless chromium and its first page."""

    def __init__(self, profile: Path) -> None:
        self._profile = profile
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    def _launch(self) -> None:
        self._profile.mkdir(parents=True, exist_ok=True)
        with (self._profile / "chromium.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [chromium(), *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdout=log, stderr=log, start_new_session=True)

    async def start(self) -> Browser:
        self._launch()
        active = self._profile / "DevToolsActivePort"
        await wait_until(active.exists, 30, "chromium's DevTools port")
        port = int(active.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        assert self._ws is not None
        call = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call, "method": method, "params": params}))
        async with asyncio.timeout(30):
            async for message in self._ws:
                data = json.loads(message.data)
                if data.get("id") == call:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return dict(data.get("result") or {})
        raise RuntimeError(f"{method}: the DevTools connection closed")

    async def go(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def text(self) -> str:
        """The page's visible text now ('' while a navigation has no document yet)."""
        result = await self.send("Runtime.evaluate",
                                 expression="document.body ? document.body.innerText : ''",
                                 returnByValue=True)
        return str((result.get("result") or {}).get("value") or "")

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))
        return path

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.poll() is None:
            # Its renderer and helper processes are in its session: the group goes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self._proc.wait)
