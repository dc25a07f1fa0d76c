"""The waking page in a real headless browser (Debian's chromium), through `torpor up` and
its real Envoy: a person who opens a sleeping service's page sees at once that it is waking
(screenshot saved), and the page turns into the service's own answer without a click. An
API client's request in the same wake is held and answered as before, and a service with
`waking_page: false` holds a browser's request too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.browser import Browser
from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

LOAD_SECONDS = 3.0


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield await b.start()
    finally:
        await b.stop()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Config]:
    plain = model_service("plain", 1) + "    waking_page: false\n"
    path = write_config(tmp_path, model_service("sleepy", 1, LOAD_SECONDS) + plain)
    runs = UpRuns()
    try:
        await runs.start(path)
        yield load_config(path)
    finally:
        await runs.stop_all()


async def hibernate(config: Config, name: str) -> None:
    status = await asyncio.to_thread(admin_client.hibernate, admin_target(config), name)
    assert status["state"] == "HIBERNATED", status


async def test_a_browser_sees_the_waking_page_then_the_answer_without_a_click(
    gateway: Config, browser: Browser, tmp_path: Path,
) -> None:
    await hibernate(gateway, "sleepy")
    port = gateway.gateway.listen.port
    # Chromium resolves *.localhost to loopback itself: the Host header is the service's.
    url = f"http://sleepy.localhost:{port}/predict?text=what%20a%20great%20day"
    await browser.go(url)
    page = ""

    async def waking() -> bool:
        nonlocal page
        page = await browser.text()
        return "is waking up" in page

    await wait_until(waking, 10, "the waking page")
    shot = await browser.screenshot(tmp_path / "waking-page.png")
    print(f"\nwaking page screenshot: {shot} ({shot.stat().st_size} bytes)\n{page}")
    assert "sleepy is waking up" in page
    assert "replica" in page and "Waking for" in page
    assert shot.stat().st_size > 5000  # a rendered page, not a blank one

    # An API client in the same wake is held and answered, not given the page.
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{gateway.gateway.listen}/predict?text=hi",
            headers={"Host": "sleepy.localhost", "Accept": "application/json"}) as r:
        assert r.status == 200 and (await r.json())["model"] == "sleepy"

    answer: dict[str, object] = {}

    async def answered() -> bool:
        text = await browser.text()
        if text.lstrip().startswith("{"):
            answer.update(json.loads(text))
            return True
        return False

    # No click: the page reloads itself until the service answers.
    await wait_until(answered, LOAD_SECONDS + 30, "the service's answer in the browser")
    assert answer["model"] == "sleepy"


async def test_a_service_without_the_waking_page_holds_a_browsers_request(
    gateway: Config,
) -> None:
    await hibernate(gateway, "plain")
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{gateway.gateway.listen}/predict?text=hi",
            headers={"Host": "plain.localhost", "Accept": "text/html"}) as r:
        assert r.status == 200
        assert "x-torpor-waking" not in r.headers
        assert (await r.json())["model"] == "plain"
