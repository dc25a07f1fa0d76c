"""The edge limits end to end, through `torpor up` with a real Envoy and a model server.

What an awake service accepts, a sleeping one accepts too: a 32 KB header and a 16 KB URL
reach it either way (asleep: held by the activator, which wakes it); WebSocket passes
Envoy to an awake service and, through the activator, to a sleeping one, which wakes.
Headers over the limit get an error that quotes nothing of the request, from Envoy and
from the activator alike, and the activator announces no Python/aiohttp version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up, stop_all
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

HOST = "edgy.localhost"
MARKER = "QZXJ"  # request bytes no answer may quote


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Config]]]:
    """start_gateway(keys) runs `torpor up` with one model service, awake; `keys` are more
    keys of the config's gateway section. Always stopped."""
    runners: list[Up] = []

    async def start(keys: str = "") -> Config:
        path = write_config(tmp_path, model_service("edgy", 1, load_seconds=0.5))
        if keys:
            path.write_text(path.read_text().replace("gateway: {", f"gateway: {{{keys}, ", 1))
        runner = Up(path)
        runners.append(runner)
        runner.start()
        await runner.wait_ready()
        config = load_config(path)

        async def answers() -> bool:
            code, _, _ = await get(config, "/healthz")
            return code == 200

        await wait_until(answers, 30, "edgy answering through Envoy", interval=0.1)
        return config

    yield start
    await stop_all(runners)


@pytest.fixture
async def gateway(start_gateway: Callable[[str], Awaitable[Config]]) -> Config:
    return await start_gateway("")


async def get(config: Config, path: str, headers: dict[str, str] | None = None,
              target: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    url = f"http://{target or config.gateway.listen}{path}"
    async with aiohttp.ClientSession() as session, \
            session.get(url, headers={"Host": HOST, **(headers or {})}) as r:
        return r.status, await r.read(), dict(r.headers)


async def state(config: Config) -> str:
    status = await asyncio.to_thread(admin_client.get_status,
                                     admin_target(config), "edgy")
    return str(status["state"])


async def hibernate(config: Config) -> None:
    status = await asyncio.to_thread(admin_client.hibernate,
                                     admin_target(config), "edgy")
    assert status["state"] == "HIBERNATED", status


async def wait_active(config: Config) -> None:
    async def active() -> bool:
        return await state(config) == "ACTIVE"

    await wait_until(active, 30, "edgy ACTIVE again", interval=0.1)


async def ws_echo(config: Config, messages: list[str]) -> tuple[list[str], dict[str, str]]:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"http://{config.gateway.listen}/ws", headers={"Host": HOST},
                               timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
        echoed = []
        for message in messages:
            await ws.send_str(message)
            received = await asyncio.wait_for(ws.receive(), 10)
            assert received.type == aiohttp.WSMsgType.TEXT, received
            echoed.append(str(received.data))
        assert ws._response is not None
        return echoed, dict(ws._response.headers)


def big_header() -> dict[str, str]:
    return {"x-big": MARKER * (32 * 1024 // len(MARKER))}


def long_url() -> str:
    return "/predict?text=good&pad=" + "a" * (16 * 1024)


async def test_large_header_url_and_websocket_awake_and_asleep(gateway: Config) -> None:
    config = gateway
    # Awake: straight to the replica.
    code, body, headers = await get(config, "/predict?text=good", big_header())
    assert code == 200, body[:300]
    assert "x-torpor-cold-start-ms" not in headers
    code, body, _ = await get(config, long_url())
    assert code == 200 and json.loads(body)["label"] == "positive", body[:300]
    echoed, _ = await ws_echo(config, ["hello", "x" * 5000])
    assert echoed == ["hello", "x" * 5000]

    # Asleep: each of them is held by the activator, wakes the service and is answered.
    await hibernate(config)
    code, body, headers = await get(config, "/predict?text=good", big_header())
    assert code == 200, body[:300]
    assert json.loads(body)["label"] == "positive"
    assert "x-torpor-cold-start-ms" in headers
    await wait_active(config)

    await hibernate(config)
    code, body, headers = await get(config, long_url())
    assert code == 200, body[:300]
    assert "x-torpor-cold-start-ms" in headers
    await wait_active(config)

    await hibernate(config)
    echoed, headers = await ws_echo(config, ["wake up", "again"])
    assert echoed == ["wake up", "again"]
    assert "x-torpor-cold-start-ms" in headers
    assert await state(config) == "ACTIVE"


async def test_oversized_headers_answered_without_echo(gateway: Config) -> None:
    config = gateway
    too_big = {"x-big": MARKER * (70 * 1024 // len(MARKER))}
    too_long = "/predict?pad=" + MARKER * (70 * 1024 // len(MARKER))

    # Envoy (the service is awake).
    for path, headers in (("/predict", too_big), (too_long, None)):
        code, body, answer_headers = await get(config, path, headers)
        assert code == 431, (code, body[:300])
        assert MARKER.encode() not in body and MARKER not in json.dumps(answer_headers)

    # The activator (what Envoy sends a sleeping service's requests to): the same limit,
    # the same answer, nothing of the request in it, no version banner.
    activator = str(config.activator.listen)
    for path, headers in (("/predict", too_big), (too_long, None)):
        code, body, answer_headers = await get(config, path, headers, target=activator)
        assert code == 431, (code, body[:300])
        assert MARKER.encode() not in body and MARKER not in json.dumps(answer_headers)
        assert json.loads(body)["error"] == "headers_too_large"
        assert answer_headers.get("Server") == "torpor", answer_headers
    # Within the limit, the activator's own answers carry no banner either.
    code, body, answer_headers = await get(config, "/", {"Host": "nobody.localhost"},
                                           target=activator)
    assert code == 404, body
    assert answer_headers.get("Server") == "torpor", answer_headers
    _assert_no_banner(answer_headers)


def _assert_no_banner(headers: dict[str, Any]) -> None:
    assert not any("python" in str(v).lower() or "aiohttp" in str(v).lower()
                   for v in headers.values()), headers


async def test_configured_limit_holds_for_envoy_and_activator(
        start_gateway: Callable[[str], Awaitable[Config]]) -> None:
    config = await start_gateway("max_request_headers_kb: 16")
    assert config.gateway.max_request_headers_kb == 16
    within = {"x-big": MARKER * (12 * 1024 // len(MARKER))}
    over = {"x-big": MARKER * (20 * 1024 // len(MARKER))}
    code, body, _ = await get(config, "/predict?text=good", within)
    assert code == 200, body[:300]
    for target in (None, str(config.activator.listen)):
        code, body, _ = await get(config, "/predict", over, target=target)
        assert code == 431, (target, code, body[:300])
        assert MARKER.encode() not in body
