"""Upstreams that die holding a request, and one that answers: Envoy's retries under test.

`AbortingUpstream` reads each request whole (head and Content-Length body), logs it, then
closes the connection without a byte of response: what Envoy sees when the activator replica
holding it, or a replica running it, is killed. `EchoUpstream` answers and logs too; together
their logs say how often each request ran.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from aiohttp import web

from tests.support.backends import Backend
from torpor.model import Endpoint

#: Request header a test sets to tell its calls apart in the upstreams' logs.
CALL_ID = "x-call-id"

class AbortingUpstream:
    """Reads each request whole (head and Content-Length body), then closes the connection
    without a byte of response: what Envoy sees when the replica holding it is killed.
    With `hold`, it keeps every request until `kill()` drops them all at once."""

    def __init__(self, name: str, reset: bool, hold: bool = False) -> None:
        self.name = name
        self.reset = reset  # RST (SO_LINGER 0) rather than FIN
        self.hold = hold
        self.received: list[tuple[str, int]] = []  # (Host, body bytes) of each request
        self.log: list[tuple[str, str]] = []  # (method, x-call-id) of each request
        self.held: list[asyncio.Transport] = []
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()

    @property
    def endpoint(self) -> Endpoint:
        assert self._server is not None
        return Endpoint("127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def start(self) -> AbortingUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Aborting(self), "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def kill(self) -> None:
        """kill -9 while holding: the listener goes (new connections are refused) and every
        held connection closes unanswered, all at once."""
        if self._server is not None:
            self._server.close()
        held, self.held = self.held, []
        for transport in held:
            self._close(transport)

    def received_whole(self, transport: asyncio.Transport) -> None:
        if self.hold:
            self.held.append(transport)
        else:
            self._close(transport)

    def _close(self, transport: asyncio.Transport) -> None:
        if self.reset:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class _Aborting(asyncio.Protocol):
    def __init__(self, owner: AbortingUpstream) -> None:
        self.owner = owner
        self.data = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.owner._transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        headers = _headers(head)
        length = int(headers.get("content-length", "0"))
        if len(body) < length:
            return
        self.owner.received.append((headers.get("host", ""), len(body)))
        method = head.split(b" ", 1)[0].decode("latin-1")
        self.owner.log.append((method, headers.get(CALL_ID, "")))
        assert self.transport is not None
        self.owner.received_whole(self.transport)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.partition(":") for line in lines)
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


class EchoUpstream(Backend):
    """Answers 200 with its name and the body length it received; logs each request."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.log: list[tuple[str, str]] = []  # (method, x-call-id) of each request

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.log.append((request.method, request.headers.get(CALL_ID, "")))
        body = await request.read()
        return web.Response(text=f"{self.name} {len(body)}")
