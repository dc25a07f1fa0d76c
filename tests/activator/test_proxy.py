"""activator/proxy.py against real aiohttp servers on loopback.

A backend app, a front app whose handler calls `Proxy.forward` to it (and turns ProxyError
into a 502, as the activator's handler does), and an aiohttp client. Every wait has a
deadline; ordering is made deterministic with events, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from activator.proxy import Proxy, ProxyError
from tests.support.net import free_port
from torpor.model import Endpoint

EXTRA = {"x-torpor-cold-start-ms": "1234"}
DEADLINE = 5.0


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def serve(app: web.Application, **runner_kwargs: Any) -> tuple[web.AppRunner, int]:
    """Start `app` on an ephemeral loopback port; the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **runner_kwargs)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class Backend:
    """The service replica: echoes what it received, streams, fails and speaks WebSocket."""

    def __init__(self) -> None:
        self.port = 0
        self.release_second = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.ws_handshake: CIMultiDict[str] = CIMultiDict()
        self.ws_close_code: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/hang", self.hang)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/fail", self.fail)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/download", self.download)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/ws-denied", self.ws_denied)
        app.router.add_route("*", "/echo{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        response = web.json_response({
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "sha256": digest.hexdigest(),
            "length": length,
        })
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # Longer than the client's deadline: if the proxy held the first chunk back, the
        # client's wait fails first and says so.
        await asyncio.wait_for(self.release_second.wait(), DEADLINE * 2)
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def hang(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first\n")
        try:
            await asyncio.Event().wait()  # a model that never finishes
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return response

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"hello " * 1000),
                            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def fail(self, request: web.Request) -> web.Response:
        return web.Response(status=503, reason="Model Overloaded", body=b"backend says no",
                            headers={"X-Backend-Error": "overloaded", "Retry-After": "7"})

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def download(self, request: web.Request) -> web.Response:
        return web.Response(body=payload(int(request.query["size"])),
                            content_type="application/octet-stream")

    async def ws_denied(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no sockets for you",
                            headers={"X-Denied-By": "backend"})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_handshake = CIMultiDict(request.headers)
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT and message.data == "close-me":
                await ws.close(code=4002, message=b"backend done")
            elif message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        if not self.ws_close_code.done():
            self.ws_close_code.set_result(ws.close_code)
        return ws


class Front:
    """The activator's stand-in: forwards everything to `target`, 502 on ProxyError."""

    def __init__(self, proxy: Proxy, target: Endpoint) -> None:
        self.proxy = proxy
        self.target = target
        self.port = 0
        self.errors: list[ProxyError] = []
        self.finished = asyncio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self.proxy.forward(request, self.target, EXTRA)
        except ProxyError as exc:
            self.errors.append(exc)
            return web.json_response(
                {"error": "bad_gateway", "retryable": exc.retryable, "message": str(exc)},
                status=502,
            )
        finally:
            self.finished.set()


class RawBackend:
    """A misbehaving backend speaking raw TCP: `mode` says how it breaks the exchange."""

    def __init__(self) -> None:
        self.mode = "drop_after_headers"
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.mode == "drop_after_body":
                await reader.readexactly(1)  # the proxy has started sending the body
            elif self.mode == "truncate":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                await writer.drain()
        finally:
            writer.close()

    def close_all(self) -> None:
        for writer in self._writers:
            writer.close()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = Backend()
    # handler_cancellation: the backend's handler is cancelled when the proxy drops the
    # upstream connection, which is how the disconnect test observes it.
    runner, server.port = await serve(server.app(), handler_cancellation=True)
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    raw = RawBackend()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    raw.port = int(server.sockets[0].getsockname()[1])
    try:
        yield raw
    finally:
        server.close()
        raw.close_all()
        await server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    forwarder = Proxy(connect_timeout=2.0)
    await forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.close()


@contextlib.asynccontextmanager
async def running_front(
    proxy: Proxy, target: Endpoint, **runner_kwargs: Any
) -> AsyncIterator[Front]:
    app = Front(proxy, target)
    runner, app.port = await serve(app.app(), **runner_kwargs)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
async def front(proxy: Proxy, backend: Backend) -> AsyncIterator[Front]:
    # Default handler_cancellation (off), like the activator's server: the proxy itself
    # must notice a client that leaves.
    async with running_front(proxy, backend.endpoint) as app:
        yield app


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --- request side ------------------------------------------------------------------------


async def test_method_raw_target_and_headers_arrive_intact(front: Front) -> None:
    target = "/echo/a%2Fb/c%20d;p=1?q=%2B+x&y=1&y=2&empty=&utf=%C3%A9"
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Host", "svc.example.test")
    headers.add("X-Multi", "one")
    headers.add("X-Multi", "two")
    headers.add("Authorization", "Bearer token")
    headers.add("Cookie", "sid=abc; theme=dark")
    headers.add("X-Forwarded-For", "203.0.113.7")
    headers.add("Connection", "keep-alive, X-Hop")
    headers.add("X-Hop", "per-connection")
    headers.add("Keep-Alive", "timeout=5")
    headers.add("TE", "trailers")
    headers.add("Proxy-Authorization", "Basic Zm9vOmJhcg==")
    skip = ("User-Agent", "Accept", "Accept-Encoding")
    async with aiohttp.ClientSession(skip_auto_headers=skip) as session:
        url = URL(front.url(target), encoded=True)
        async with session.patch(url, headers=headers) as resp:
            assert resp.status == 200
            seen = await resp.json()
            assert resp.headers["x-torpor-cold-start-ms"] == "1234"
            assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]

    assert seen["method"] == "PATCH"
    assert seen["raw_path"] == target
    got: CIMultiDict[str] = CIMultiDict(seen["headers"])
    assert got.getall("Host") == ["svc.example.test"]
    assert got.getall("X-Multi") == ["one", "two"]
    assert got["Authorization"] == "Bearer token"
    assert got["Cookie"] == "sid=abc; theme=dark"
    assert got.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert got["X-Forwarded-Proto"] == "http"
    for hop in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert hop not in got, hop
    for auto in skip:  # the proxy adds nothing the client did not send
        assert auto not in got, auto


@pytest.mark.parametrize("size", [4 * 1024, 10 * 1024 * 1024], ids=["4KB", "10MB"])
async def test_request_body_arrives_byte_identical(
    front: Front, client: aiohttp.ClientSession, size: int
) -> None:
    body = payload(size)
    async with client.post(front.url("/echo"), data=io.BytesIO(body)) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert (seen["length"], seen["sha256"]) == (size, sha256(body))
    got: CIMultiDict[str] = CIMultiDict(seen["headers"])
    assert got["Content-Length"] == str(size)


async def test_expect_continue_is_answered_once_and_not_forwarded(
    front: Front, client: aiohttp.ClientSession
) -> None:
    body = payload(64 * 1024)
    async with client.post(front.url("/echo"), data=body, expect100=True) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["sha256"] == sha256(body)
    assert "Expect" not in CIMultiDict(seen["headers"])


async def test_chunked_request_body_is_streamed(
    front: Front, client: aiohttp.ClientSession
) -> None:
    pieces = [payload(64 * 1024, seed=i) for i in range(40)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with client.put(front.url("/echo/chunked"), data=chunks()) as resp:
        assert resp.status == 200
        seen = await resp.json()
    body = b"".join(pieces)
    assert (seen["length"], seen["sha256"]) == (len(body), sha256(body))
    got: CIMultiDict[str] = CIMultiDict(seen["headers"])
    assert got["Transfer-Encoding"] == "chunked"


# --- response side -----------------------------------------------------------------------


async def test_response_body_arrives_byte_identical(
    front: Front, client: aiohttp.ClientSession
) -> None:
    size = 8 * 1024 * 1024
    async with client.get(front.url(f"/download?size={size}")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert sha256(await resp.read()) == sha256(payload(size))


async def test_head_keeps_content_length_without_body(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.head(front.url("/download?size=1000")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""


async def test_streamed_response_reaches_client_chunk_by_chunk(
    front: Front, backend: Backend, client: aiohttp.ClientSession
) -> None:
    async with client.get(front.url("/stream")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["x-torpor-cold-start-ms"] == "1234"
        # The backend writes the second event only after this first one reached us.
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), DEADLINE)
        assert first == b"data: first\n\n"
        backend.release_second.set()
        rest = await asyncio.wait_for(resp.content.read(), DEADLINE)
        assert rest == b"data: second\n\n"


async def test_content_encoding_passes_through_untouched(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.get(front.url("/gzip"), headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
    assert gzip.decompress(body) == b"hello " * 1000


async def test_backend_5xx_passes_through_unchanged(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.get(front.url("/fail")) as resp:
        assert (resp.status, resp.reason) == (503, "Model Overloaded")
        assert resp.headers["X-Backend-Error"] == "overloaded"
        assert resp.headers["Retry-After"] == "7"
        assert resp.headers["x-torpor-cold-start-ms"] == "1234"
        assert await resp.read() == b"backend says no"
    assert front.errors == []


async def test_redirect_is_not_followed(front: Front, client: aiohttp.ClientSession) -> None:
    async with client.get(front.url("/redirect"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"


# --- WebSocket ---------------------------------------------------------------------------


async def test_websocket_relays_text_binary_and_client_close_code(
    front: Front, backend: Backend
) -> None:
    handshakes: list[CIMultiDict[str]] = []

    async def on_request_end(session: Any, context: Any, params: Any) -> None:
        handshakes.append(CIMultiDict(params.response.headers))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with session.ws_connect(
            front.url("/ws?room=1"),
            protocols=("chat.v0", "chat.v1"),
            headers={"Authorization": "Bearer ws", "Cookie": "sid=ws"},
        ) as ws:
            assert ws.protocol == "chat.v1"
            await ws.send_str("héllo")
            text = await asyncio.wait_for(ws.receive(), DEADLINE)
            assert (text.type, text.data) == (aiohttp.WSMsgType.TEXT, "héllo")
            await ws.send_bytes(b"\x00\xffbinary")
            binary = await asyncio.wait_for(ws.receive(), DEADLINE)
            assert (binary.type, binary.data) == (aiohttp.WSMsgType.BINARY, b"\x00\xffbinary")
            await asyncio.wait_for(ws.close(code=4001, message=b"client bye"), DEADLINE)

    assert await asyncio.wait_for(backend.ws_close_code, DEADLINE) == 4001
    assert handshakes[0]["x-torpor-cold-start-ms"] == "1234"
    assert backend.ws_handshake["Authorization"] == "Bearer ws"
    assert backend.ws_handshake["Cookie"] == "sid=ws"
    assert backend.ws_handshake["Sec-WebSocket-Protocol"] == "chat.v0,chat.v1"
    assert backend.ws_handshake["X-Forwarded-For"] == "127.0.0.1"


async def test_websocket_backend_close_code_reaches_client(front: Front) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(front.url("/ws")) as ws:
            await ws.send_str("close-me")
            closing = await asyncio.wait_for(ws.receive(), DEADLINE)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert (closing.data, closing.extra) == (4002, "backend done")


async def test_websocket_declined_by_backend_passes_status_through(front: Front) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(front.url("/ws-denied"))
    assert refused.value.status == 403
    assert refused.value.headers is not None
    assert refused.value.headers["X-Denied-By"] == "backend"


# --- failures ----------------------------------------------------------------------------


async def test_refused_connection_is_retryable(
    front: Front, client: aiohttp.ClientSession
) -> None:
    front.target = Endpoint("127.0.0.1", free_port())  # nothing listens there
    async with client.post(front.url("/echo"), data=b"held body") as resp:
        assert resp.status == 502
        answer = await resp.json()
    assert answer["retryable"] is True
    assert str(front.target) in answer["message"]
    assert [e.retryable for e in front.errors] == [True]


async def test_refused_websocket_is_retryable(front: Front) -> None:
    front.target = Endpoint("127.0.0.1", free_port())
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(front.url("/ws"))
    assert refused.value.status == 502
    assert [e.retryable for e in front.errors] == [True]


async def test_reset_after_body_started_is_not_retryable(
    front: Front, raw_backend: RawBackend, client: aiohttp.ClientSession
) -> None:
    raw_backend.mode = "drop_after_body"
    front.target = raw_backend.endpoint
    async with client.post(front.url("/echo"), data=payload(4096)) as resp:
        assert resp.status == 502
        assert (await resp.json())["retryable"] is False
    assert [e.retryable for e in front.errors] == [False]


async def test_reset_before_response_to_get_is_retryable(
    front: Front, raw_backend: RawBackend, client: aiohttp.ClientSession
) -> None:
    raw_backend.mode = "drop_after_headers"
    front.target = raw_backend.endpoint
    async with client.get(front.url("/echo")) as resp:
        assert resp.status == 502
    assert [e.retryable for e in front.errors] == [True]


async def test_upstream_failure_mid_body_truncates_client_response(
    front: Front, raw_backend: RawBackend, client: aiohttp.ClientSession
) -> None:
    raw_backend.mode = "truncate"
    front.target = raw_backend.endpoint
    async with client.get(front.url("/truncated")) as resp:
        assert resp.status == 200  # already sent when the backend failed
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), DEADLINE)
    assert front.errors == []


async def test_client_disconnect_cancels_upstream_request(
    front: Front, backend: Backend, client: aiohttp.ClientSession
) -> None:
    resp = await client.get(front.url("/hang"))
    try:
        assert await asyncio.wait_for(resp.content.readline(), DEADLINE) == b"first\n"
    finally:
        resp.close()  # drops the client's connection mid-stream
    await asyncio.wait_for(backend.hang_cancelled.wait(), DEADLINE)
    await asyncio.wait_for(front.finished.wait(), DEADLINE)


async def test_client_disconnect_with_handler_cancellation(
    proxy: Proxy, backend: Backend, client: aiohttp.ClientSession
) -> None:
    """A server that cancels handlers on disconnect cancels forward(): still no leak."""
    async with running_front(proxy, backend.endpoint, handler_cancellation=True) as front:
        resp = await client.get(front.url("/hang"))
        try:
            assert await asyncio.wait_for(resp.content.readline(), DEADLINE) == b"first\n"
        finally:
            resp.close()
        await asyncio.wait_for(backend.hang_cancelled.wait(), DEADLINE)
        await asyncio.wait_for(front.finished.wait(), DEADLINE)


async def test_forward_requires_start() -> None:
    never_started = Proxy()
    with pytest.raises(RuntimeError):
        await never_started.forward(None, Endpoint("127.0.0.1", 1), {})  # type: ignore[arg-type]
