"""activator/edge_server.py on raw sockets: the parser limits come from EdgeLimits, and a
request aiohttp cannot parse is answered without quoting it and without a version banner."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from activator.edge_server import EdgeAppRunner
from activator.proxy import Proxy
from tests.support.net import free_port
from torpor.edge import EdgeLimits
from torpor.model import Endpoint

MARKER = b"QZXJ"


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _ok)
    runner = EdgeAppRunner(app, EdgeLimits(max_request_headers_kb=4), access_log=None)
    await runner.setup()
    chosen = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", chosen).start()
        yield chosen
    finally:
        await runner.cleanup()


async def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the error closes the connection
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _request(path: str = "/", header: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + header + b"\r\n")


async def test_within_the_limit_served_with_torpor_as_server(port: int) -> None:
    code, headers, body = await _exchange(port, _request(header=b"x-big: " + b"a" * 3000
                                                         + b"\r\n"))
    assert code == 200 and body == b"ok"
    assert headers["Server"] == "torpor"


@pytest.mark.parametrize("raw", [
    _request(header=b"x-big: " + MARKER * 1500 + b"\r\n"),  # 6 KB header, limit 4 KB
    _request(path="/" + (MARKER * 1500).decode()),  # 6 KB URL
], ids=["header", "url"])
async def test_over_the_limit_431_without_echo(port: int, raw: bytes) -> None:
    code, headers, body = await _exchange(port, raw)
    assert code == 431
    assert json.loads(body)["error"] == "headers_too_large"
    assert MARKER not in body and headers["Server"] == "torpor"


async def test_malformed_request_400_without_echo(port: int) -> None:
    code, headers, body = await _exchange(
        port, b"GET / HTTP/1.1\r\nHost: x\r\nbad header QZXJ\r\n\r\n")
    assert code == 400
    assert json.loads(body)["error"] == "bad_request"
    assert MARKER not in body and headers["Server"] == "torpor"


async def test_proxy_passes_a_service_answer_with_large_headers() -> None:
    """A 20 KB response header (aiohttp's client default stops at 8 KB) reaches the client."""
    big = "b" * 20_000

    async def service(request: web.Request) -> web.Response:
        return web.Response(text="served", headers={"x-big": big})

    proxy = Proxy()
    await proxy.start()
    backend_port, front_port = free_port(), free_port()

    async def front(request: web.Request) -> web.StreamResponse:
        return await proxy.forward(request, Endpoint("127.0.0.1", backend_port), {})

    runners = []
    try:
        for handler, chosen in ((service, backend_port), (front, front_port)):
            app = web.Application()
            app.router.add_get("/", handler)
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", chosen).start()
        async with aiohttp.ClientSession(max_field_size=64 * 1024) as session, \
                session.get(f"http://127.0.0.1:{front_port}/") as response:
            assert response.status == 200 and await response.text() == "served"
            assert response.headers["x-big"] == big
    finally:
        for runner in runners:
            await runner.cleanup()
        await proxy.close()
