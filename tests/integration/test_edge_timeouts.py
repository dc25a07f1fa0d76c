"""The listener's header timeout and the catch-all's access-log marker, through a real Envoy.

The header timeout (torpor/edge.py `request_headers_timeout`) is Envoy's stream idle
timeout on the listener, and every route sets Envoy's default idle timeout once the headers
are in (xds_server/resources.py): one timer per stream instead of two. So a client that
trickles its headers is answered 408, and a routed request whose upstream takes longer than
the header timeout is not cut. Only the catch-all's requests are logged (the header it
adds, x-envoy-ip-tags); Envoy strips that header from clients, so a client cannot have its
request to a service logged (and counted twice) by sending it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.backends import Backend, start_backends
from tests.support.envoy import Envoy, stop_envoy
from tests.support.net import free_port, wait_until
from tests.support.xds import XdsHarness, svc
from torpor.edge import EdgeLimits
from xds_server.resources import CATCH_ALL_MARKER, CATCH_ALL_VHOST

pytestmark = pytest.mark.envoy

HEADER_TIMEOUT = 1.0
#: Longer than the header timeout: a routed request must outlive it.
SLOW_ANSWER = 2.5


class SlowBackend(Backend):
    """Answers after SLOW_ANSWER seconds."""

    async def _handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_ANSWER)
        return await super()._handle(request)


class Gateway:
    def __init__(self, port: int, entries: list[tuple[str, str]]) -> None:
        self.port = port
        self.entries = entries  # (route_name, authority) of every access-log entry received


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    activator, fast = await start_backends("activator", "fast")
    slow = await SlowBackend("slow").start()
    harness = XdsHarness(activator.endpoint, edge=EdgeLimits(
        request_headers_timeout=HEADER_TIMEOUT))
    entries: list[tuple[str, str]] = []
    ingest = harness.collector.ingest

    def recording(batch: Iterable[Any]) -> None:
        batch = list(batch)
        entries.extend((e.common_properties.route_name, e.request.authority) for e in batch)
        ingest(batch)

    harness.collector.ingest = recording  # type: ignore[method-assign]
    envoy: Envoy | None = None
    try:
        await harness.start([svc("fast", fast.endpoint), svc("slow", slow.endpoint)])
        envoy = Envoy(tmp_path, "edge", free_port(), harness.xds_port)
        envoy.start()
        await envoy.wait_ready()
        yield Gateway(harness.listen_port, entries)
    finally:
        if envoy is not None:
            await stop_envoy(envoy)
        await harness.stop()
        for backend in (activator, fast, slow):
            await backend.stop()


async def test_a_client_trickling_its_headers_is_answered_408(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: fast.test\r\nX-Slow: ")
        answer = b""

        async def trickle() -> None:
            while True:  # one byte of the header every 0.2 s, never its end
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.2)

        task = asyncio.create_task(trickle())
        try:
            answer = await asyncio.wait_for(reader.read(200), timeout=20 * HEADER_TIMEOUT)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer


async def test_a_routed_request_outlives_the_header_timeout(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{gateway.port}/", headers={"Host": "slow.test"}) as r:
        assert r.status == 200
        assert await r.text() == "slow"


async def test_only_the_catch_alls_requests_are_logged_whatever_the_client_sends(
    gateway: Gateway,
) -> None:
    # One connection: one Envoy worker, one access-log stream, entries in order.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for host in ("fast.test", "fast.test", "stranger.test"):
            headers = {"Host": host, CATCH_ALL_MARKER: CATCH_ALL_VHOST}
            async with session.get(f"http://127.0.0.1:{gateway.port}/", headers=headers) as r:
                await r.read()
                assert r.status == 200
    await wait_until(lambda: any(a == "stranger.test" for _, a in gateway.entries), 20,
                     "the catch-all's access-log entry")
    assert [a for _, a in gateway.entries] == ["stranger.test"]
    assert all(name.startswith(CATCH_ALL_VHOST) for name, _ in gateway.entries)
