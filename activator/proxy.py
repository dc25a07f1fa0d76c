"""Forwarding one held request to one ready replica, streaming in both directions.

Owns: sending one request to one endpoint and relaying its answer faithfully. The backend
sees the same method, raw path and query (percent-encoding intact), the same end-to-end
headers (Host included) and the body streamed as it arrives; the client sees the same
status, reason and end-to-end headers, and the body chunk by chunk as the backend writes it,
never decompressed, redirects never followed. A WebSocket upgrade becomes two WebSockets
with frames and close codes relayed between them. It also decides whether a failure left
the request replayable on another endpoint (`ProxyError.retryable`).

Must not: choose endpoints, hold requests, wake services or retry by itself (handler.py,
holding.py and waker.py do that), and never answer with an error page of its own: the
caller turns a ProxyError into its 502.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from torpor.edge import ENVOY_ADDED_HEADERS, EdgeLimits
from torpor.errors import TorporError
from torpor.logs import event
from torpor.model import Endpoint

log = logging.getLogger("torpor.activator.proxy")

#: Headers that describe one connection, not the message (RFC 9110 §7.6.1); never forwarded.
#: Every `Proxy-*` header and every header named in `Connection` is dropped as well.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)

#: The activator's own server already answered `Expect: 100-continue`; forwarding it would
#: make the upstream request wait for a second interim response.
_REQUEST_ONLY_HOP = frozenset({"expect"})

#: The handshake headers of one WebSocket hop; each hop negotiates its own.
_WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)

#: aiohttp adds these to every request unless told not to; the backend must see only what
#: the client sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

#: Methods a backend may receive twice without harm (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: How often a forward checks whether its client has gone (see `_client_left`).
CLIENT_CHECK_SECONDS = 1.0

#: Response header limits towards the services: the edge limits' defaults (torpor/edge.py).
_RESPONSE_LIMITS = EdgeLimits()

#: Largest WebSocket message relayed; aiohttp reassembles fragmented messages in memory.
WS_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: What a failing upstream exchange raises: aiohttp's errors, socket errors, timeouts.
_UPSTREAM_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)

#: Close codes that must never be sent on the wire (RFC 6455 §7.4.1).
_RESERVED_CLOSE_CODES = frozenset({1005, 1006, 1015})

#: Status the access log records when the client hung up before any answer (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


class ProxyError(TorporError):
    """The request could not be forwarded.

    `retryable` is True only when nothing of the request reached the backend in a way it
    could have acted on: the connection was refused or timed out, or it was reset before
    any byte of the body was read from the client (a bodiless request: only for idempotent
    methods, since its headers may have been processed). The caller may then try another
    endpoint; otherwise it answers 502.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclasses.dataclass
class _Exchange:
    """What one forward has done so far: decides retryability, and what to hand back if
    the client leaves midway."""

    body_started: bool = False
    response: web.StreamResponse | None = None


class Proxy:
    """Forwards held requests to ready endpoints over one pooled aiohttp client session.

    `connect_timeout` bounds opening a connection; `read_timeout` bounds every wait for
    upstream bytes (response headers and each body chunk); None allows a model to think
    for as long as it needs.
    """

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float | None = None) -> None:
        # `connect` would also count waiting for a pool slot; only the TCP connect is bounded.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the shared session (idempotent)."""
        if self._session is not None:
            return
        # limit=0: how many requests run at once is holding.py's decision, not the pool's;
        # a pool cap would queue held requests behind slow ones.
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            timeout=self._timeout,
            skip_auto_headers=_NO_AUTO_HEADERS,
            # A service's answer may carry headers as large as a request may (Envoy passes
            # them to an awake service's client); aiohttp's default is 8 KB.
            max_line_size=_RESPONSE_LIMITS.max_request_headers_bytes,
            max_field_size=_RESPONSE_LIMITS.max_request_headers_bytes,
            max_headers=_RESPONSE_LIMITS.max_request_headers_count + ENVOY_ADDED_HEADERS,
        )

    async def close(self) -> None:
        """Close the session and every pooled connection (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def forward(
        self,
        request: web.Request,
        endpoint: Endpoint,
        extra_response_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Forward `request` to `endpoint` and stream the answer back to the client.

        Returns the (already sent) response for the handler to return. Raises ProxyError
        when nothing was sent to the client yet. A failure after the response started is
        logged and ends the client's connection, so that it sees a truncated response
        rather than a complete-looking one. A client that leaves cancels the upstream
        request; the returned response then has status 499 if none had started.
        """
        if self._session is None:
            raise RuntimeError("Proxy.start() must be awaited before forward()")
        if _is_websocket_upgrade(request):
            return await _forward_websocket(
                self._session, request, endpoint, extra_response_headers
            )
        exchange = _Exchange()
        work = _forward_http(self._session, request, endpoint, extra_response_headers, exchange)
        return await _unless_client_leaves(request, endpoint, work, exchange)


# --- plain HTTP --------------------------------------------------------------------------


async def _forward_http(
    session: aiohttp.ClientSession,
    request: web.Request,
    endpoint: Endpoint,
    extra_response_headers: Mapping[str, str],
    exchange: _Exchange,
) -> web.StreamResponse:
    """Send the request upstream, then relay the upstream response."""
    body = _stream_body(request, exchange) if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            upstream_url(endpoint, request),
            headers=upstream_request_headers(request),
            data=body,
            allow_redirects=False,
        )
    except _UPSTREAM_ERRORS as exc:
        retryable = _is_retryable(exc, request.method, request.body_exists, exchange)
        _log_failure(request, endpoint, exc, phase="request", retryable=retryable)
        raise ProxyError(_describe(endpoint, exc), retryable=retryable) from exc
    try:
        return await _relay_response(request, endpoint, upstream, extra_response_headers,
                                     exchange)
    finally:
        # After a complete body this returns the connection to the pool; otherwise (client
        # gone, upstream failed, cancelled) aiohttp closes it instead of reusing it.
        upstream.release()


async def _stream_body(request: web.Request, exchange: _Exchange) -> AsyncIterator[bytes]:
    """The client's body as it arrives, never read whole into memory. aiohttp starts
    iterating only once it writes the request, which is what `body_started` records."""
    exchange.body_started = True
    async for chunk in request.content.iter_any():
        yield chunk


async def _relay_response(
    request: web.Request,
    endpoint: Endpoint,
    upstream: aiohttp.ClientResponse,
    extra_response_headers: Mapping[str, str],
    exchange: _Exchange,
) -> web.StreamResponse:
    """Send upstream's status and headers at once, then each body chunk as it arrives,
    so that a server-sent-events stream reaches the client before the backend finishes."""
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=response_headers(upstream.headers, extra_response_headers),
    )
    exchange.response = response
    try:
        await response.prepare(request)
    except ConnectionError:
        _log_client_gone(request, endpoint)
        upstream.close()
        return response
    while True:
        try:
            chunk = await upstream.content.readany()
        except _UPSTREAM_ERRORS as exc:
            _log_failure(request, endpoint, exc, phase="response_body", retryable=False)
            upstream.close()
            _end_client_connection(request)
            return response
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionError:
            _log_client_gone(request, endpoint)
            upstream.close()
            return response
    await response.write_eof()
    return response


def _end_client_connection(request: web.Request) -> None:
    """Close the client's connection without the end-of-body marker: a chunked response
    then lacks its last chunk and a sized one is short, so the client knows it is
    truncated. (aiohttp's own write_eof afterwards fails quietly on the closed transport.)"""
    transport = request.transport
    if transport is not None:
        transport.close()


async def _unless_client_leaves(
    request: web.Request,
    endpoint: Endpoint,
    work: Coroutine[Any, Any, web.StreamResponse],
    exchange: _Exchange,
) -> web.StreamResponse:
    """Run `work`, cancelling it (and so the upstream request) if the client hangs up.

    Without this a backend that is silent for minutes (a model still thinking, an idle
    event stream) would keep working for nobody, since a dead client is noticed only on
    the next write.
    """
    forwarding = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait((forwarding, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        forwarding.cancel()  # no-op when it has finished
        await asyncio.wait((forwarding, watching))
    if not forwarding.cancelled():
        return forwarding.result()
    _log_client_gone(request, endpoint)
    if exchange.response is not None:
        return exchange.response
    return web.Response(status=CLIENT_CLOSED_REQUEST, reason="Client Closed Request")


async def _client_left(request: web.Request) -> None:
    """Return once the client's connection has closed.

    aiohttp cancels a handler on disconnect only when its server runs with
    `handler_cancellation=True`, and offers no disconnect callback otherwise, so this
    polls the transport: one cheap timer per request in flight.
    """
    while _connected(request):  # noqa: ASYNC110 - aiohttp offers no event to wait on
        await asyncio.sleep(CLIENT_CHECK_SECONDS)


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


# --- WebSocket ---------------------------------------------------------------------------


async def _forward_websocket(
    session: aiohttp.ClientSession,
    request: web.Request,
    endpoint: Endpoint,
    extra_response_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Open the backend's WebSocket first (so a refusal can still be retried or answered
    502), then accept the client's with the subprotocol the backend chose, and relay."""
    try:
        backend_ws = await session.ws_connect(
            upstream_url(endpoint, request),
            protocols=offered_subprotocols(request),
            headers=upstream_request_headers(request, drop=_WEBSOCKET_HANDSHAKE),
            autoclose=False,
            max_msg_size=WS_MAX_MESSAGE_BYTES,
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 101:  # it said yes, but not in a way aiohttp accepts
            _log_failure(request, endpoint, exc, phase="websocket", retryable=False)
            raise ProxyError(_describe(endpoint, exc), retryable=False) from exc
        return _declined_upgrade(exc, extra_response_headers)
    except _UPSTREAM_ERRORS as exc:
        retryable = _is_retryable(exc, request.method, False, _Exchange())
        _log_failure(request, endpoint, exc, phase="websocket", retryable=retryable)
        raise ProxyError(_describe(endpoint, exc), retryable=retryable) from exc
    try:
        client_ws = web.WebSocketResponse(
            protocols=(backend_ws.protocol,) if backend_ws.protocol else (),
            autoclose=False,
            max_msg_size=WS_MAX_MESSAGE_BYTES,
        )
        client_ws.headers.update(extra_response_headers)
        await client_ws.prepare(request)
        await _relay_frames(client_ws, backend_ws)
    finally:
        await backend_ws.close()
    return client_ws


def _declined_upgrade(
    exc: aiohttp.WSServerHandshakeError, extra_response_headers: Mapping[str, str]
) -> web.StreamResponse:
    """The backend answered the upgrade with an ordinary response (401, 404, 503, ...):
    pass its status and headers on. aiohttp discards that response's body."""
    headers = response_headers(
        exc.headers or CIMultiDict[str](), extra_response_headers,
        drop=frozenset({"content-length", "content-encoding"}),
    )
    return web.Response(status=exc.status, headers=headers)


async def _relay_frames(
    client_ws: web.WebSocketResponse, backend_ws: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay both ways until either side closes; then close the other with its code."""
    pumps = (
        asyncio.ensure_future(_pump(client_ws, backend_ws, aiohttp.WSCloseCode.GOING_AWAY)),
        asyncio.ensure_future(_pump(backend_ws, client_ws, aiohttp.WSCloseCode.INTERNAL_ERROR)),
    )
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.wait(pumps)
        await client_ws.close()


_AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: _AnyWebSocket, sink: _AnyWebSocket, abnormal_code: int) -> None:
    """Copy messages from `source` to `sink` until `source` closes.

    A close frame is passed on with its code; the sink's reply code goes back to the
    source, completing both closing handshakes. A source that vanished without a close
    frame closes the sink with `abnormal_code`. CLOSING means the other pump is closing
    `source`: nothing left to do here.
    """
    while True:
        message = await source.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is aiohttp.WSMsgType.CLOSE:
            code = _wire_close_code(message.data, aiohttp.WSCloseCode.OK)
            reason = (message.extra or "").encode()
            await sink.close(code=code, message=reason)
            await source.close(code=_wire_close_code(sink.close_code, code), message=reason)
            return
        elif message.type is aiohttp.WSMsgType.CLOSING:
            return
        elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            await sink.close(code=abnormal_code)
            return


def _wire_close_code(code: int | None, fallback: int) -> int:
    """`code` if it may be sent in a close frame, else `fallback`."""
    if code is None or code in _RESERVED_CLOSE_CODES or not 1000 <= code < 5000:
        return fallback
    return code


# --- headers, URL, errors ----------------------------------------------------------------


def _is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").strip().lower() == "websocket"
    )


def upstream_url(endpoint: Endpoint, request: web.Request) -> URL:
    """The endpoint's address with the request's target exactly as the client sent it."""
    target = request.raw_path
    if not target.startswith("/"):  # absolute-form or `*`: keep only path and query
        target = request.rel_url.raw_path_qs
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return URL(f"http://{host}:{endpoint.port}{target}", encoded=True)


def end_to_end_headers(
    headers: MultiMapping[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """`headers` without hop-by-hop ones (and without `drop`), repeats and order kept."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in named or lower in drop:
            continue
        kept.add(name, value)
    return kept


def upstream_request_headers(
    request: web.Request, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """End-to-end request headers (Host kept) plus X-Forwarded-For/-Proto."""
    headers = end_to_end_headers(request.headers, drop | _REQUEST_ONLY_HOP)
    if request.remote:
        forwarded_for = headers.getall("X-Forwarded-For", [])
        headers.popall("X-Forwarded-For", None)
        headers["X-Forwarded-For"] = ", ".join([*forwarded_for, request.remote])
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    return headers


def response_headers(
    upstream: MultiMapping[str],
    extra: Mapping[str, str],
    drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """End-to-end response headers, with `extra` replacing any of the same name."""
    headers = end_to_end_headers(upstream, drop)
    headers.update(extra)
    return headers


def offered_subprotocols(request: web.Request) -> tuple[str, ...]:
    """The WebSocket subprotocols the client offered, in its order of preference."""
    return tuple(
        token.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for token in value.split(",")
        if token.strip()
    )


def _is_retryable(exc: BaseException, method: str, has_body: bool, exchange: _Exchange) -> bool:
    """Whether the request can go to another endpoint without risk (see ProxyError)."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return True  # never connected
    if isinstance(exc, TimeoutError) or not isinstance(exc, aiohttp.ClientConnectionError):
        return False  # the backend may be working on it, or answered something broken
    if exchange.body_started:
        return False  # part of the body is gone from the client's stream
    return has_body or method in _IDEMPOTENT


def _describe(endpoint: Endpoint, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"could not forward to {endpoint}: {detail}"


def _log_failure(
    request: web.Request, endpoint: Endpoint, exc: BaseException, *, phase: str, retryable: bool
) -> None:
    event(
        log, "activator.proxy_failed", level=logging.WARNING,
        host=request.host, method=request.method, path=request.path,
        endpoint=str(endpoint), phase=phase, retryable=retryable,
        error=f"{type(exc).__name__}: {exc}",
    )


def _log_client_gone(request: web.Request, endpoint: Endpoint) -> None:
    event(
        log, "activator.proxy_client_gone",
        host=request.host, method=request.method, path=request.path, endpoint=str(endpoint),
    )
