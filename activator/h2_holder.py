"""HTTP/2 (h2c, prior knowledge) front of the activator: the second way to answer a
held request, for services whose Envoy cluster speaks HTTP/2 (gRPC above all).

Owns: the HTTP/2 connections Envoy opens to the activator (one `h2` state machine each, many
request streams multiplexed on it), finding each stream's service by `:authority` (or `host`)
in the stream's own task (holding.ServiceLookup, which may refresh the catalog), holding the
stream with `after_wake` (holding.Holding: bounded, at most `wake_timeout`) until the service
is awake and Envoy's endpoints have flipped back, and rendering the answer answers.py gives
as headers: for a ready service, a headers-only 503 carrying RETRY_HEADER. Envoy's route
retry policy (`retry_on: retriable-headers`, `retriable_headers: [x-torpor-retry]`) turns
that answer into a replay of the request, from Envoy's own buffer, to the now-ready replicas:
the real response never passes through Python.

Must not: proxy or keep request bodies (DATA is acknowledged for flow control and dropped;
Envoy keeps its own copy for the retry), wake, bound queues or decide what a failure means
(holding.py, answers.py) itself, put the retry marker on any answer but READY, block an h2
callback on a lookup, or answer a stream whose client reset it or went away (it leaves its
queue, counted as abandoned "disconnected").
"""

from __future__ import annotations

import asyncio
import logging

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from activator.answers import (
    RETRY_AFTER_SECONDS,
    Answer,
    answer_for,
    internal_error,
    unknown_host,
)
from activator.holding import AfterWake, Holding, Lookup
from torpor.errors import TorporError
from torpor.logs import event
from torpor.routes import SERVICE_HEADER, VERSION_HEADER

log = logging.getLogger("torpor.activator")

#: Response header that marks "ready now, replay me". Envoy's route for an HTTP/2 service
#: has retry_policy {retry_on: retriable-headers, retriable_headers: [{name: x-torpor-retry}]}.
RETRY_HEADER = "x-torpor-retry"
#: Streams one Envoy connection may hold open at once (h2's default is 100; Envoy opens
#: another connection when a connection is full).
MAX_CONCURRENT_STREAMS = 1000
#: Largest request header block accepted (h2's default, advertised to the peer).
MAX_HEADER_LIST_SIZE = 65536


def render(answer: Answer, content_type: str) -> tuple[list[tuple[str, str]], bytes]:
    """Response headers and body of `answer` for a request of `content_type`.

    The retry answer is headers-only, with the gRPC status too (Envoy passes it on when it
    runs out of retries). A gRPC request gets every answer trailers-only style (status and
    message in the headers, no body: a body would be read as a gRPC message); any other
    request gets a short text body instead of the gRPC headers.
    """
    headers = [(":status", str(answer.status))]
    if answer.retry:
        headers.append((RETRY_HEADER, "1"))
    if answer.retry_after:
        headers.append(("retry-after", str(RETRY_AFTER_SECONDS)))
    grpc = content_type.startswith("application/grpc")
    if grpc or answer.retry:
        if grpc:
            headers.append(("content-type", content_type))
        headers.append(("grpc-status", str(answer.grpc_status)))
        headers.append(("grpc-message", grpc_message(answer.message)))
        return headers, b""
    body = (answer.message + "\n").encode("utf-8")
    headers.append(("content-type", "text/plain; charset=utf-8"))
    headers.append(("content-length", str(len(body))))
    return headers, body


def grpc_message(text: str) -> str:
    """`text` percent-encoded as the gRPC spec asks of grpc-message (UTF-8, then every byte
    outside printable ASCII, and '%', as %XX)."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                   for b in text.encode("utf-8"))


class H2Holder:
    """Holds HTTP/2 request streams of sleeping services and answers them "retry now"."""

    def __init__(self, lookup: Lookup, holding: Holding,
                 after_wake: AfterWake | None = None) -> None:
        """`after_wake(name)` confirms that every Envoy routes `name` to its replicas again:
        without it, a replay could come straight back to the activator."""
        self._lookup = lookup
        self._holding = holding
        self._after_wake = after_wake
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen for h2c connections on host:port; returns the bound port (port may be 0)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                    backlog=4096)
        except OSError as exc:
            raise TorporError(f"cannot listen for HTTP/2 on {host}:{port}: {exc.strerror}") \
                from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        event(log, "activator.h2.listening", host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening, refuse every held stream (RST_STREAM REFUSED_STREAM: not processed,
        safe to retry elsewhere), say GOAWAY and close every connection. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def stop_listening(self) -> None:
        """Accept no new connection (the drain); open connections go on."""
        if self._server is not None:
            self._server.close()

    @property
    def draining(self) -> bool:
        return self._holding.draining

    async def wait_idle(self) -> None:
        """Until no stream is being looked up, held or answered (the activator's drain)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))  # never cancels them, unlike gather

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_ready(self, name: str) -> Answer:
        """Hold one request of `name` until its service is awake and the flip confirmed, and
        say how to answer it. Raises CancelledError (counted as abandoned "disconnected")
        when the stream goes away meanwhile."""
        return answer_for(await self._holding.hold(name, self._after_wake))


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy: frames in, events, answers out."""

    def __init__(self, holder: H2Holder) -> None:
        self._holder = holder
        self._h2 = H2Connection(config=H2Configuration(client_side=False,
                                                       header_encoding="utf-8"))
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._unsent: dict[int, bytes] = {}  # body bytes waiting for flow-control window
        self._closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._holder._connections.add(self)
        self._h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        })
        self._h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:
            event(log, "activator.h2.protocol_error", error=str(exc), level=logging.WARNING)
            self._flush()  # h2 has queued the GOAWAY that says why
            self._close_transport()
            return
        for received in events:
            self._on_event(received)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._holder._connections.discard(self)
        self._unsent.clear()
        for task in self._streams.values():
            task.cancel()
        self._streams.clear()

    # h2 events

    def _on_event(self, received: Event) -> None:
        if isinstance(received, RequestReceived):
            self._on_request(received)
        elif isinstance(received, DataReceived):
            # Dropped: Envoy replays the body from its own buffer. Acknowledged, so that
            # the peer may go on sending (connection and stream windows).
            self._h2.acknowledge_received_data(received.flow_controlled_length,
                                               received.stream_id)
        elif isinstance(received, StreamReset):
            self._unsent.pop(received.stream_id, None)
            task = self._streams.pop(received.stream_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(received, WindowUpdated | RemoteSettingsChanged):
            for stream_id in list(self._unsent):
                self._send_unsent(stream_id)
        elif isinstance(received, ConnectionTerminated):
            self._close_transport()

    def _on_request(self, received: RequestReceived) -> None:
        stream_id = received.stream_id
        if self._holder.draining:
            # Not processed: Envoy's retry policy (refused-stream) replays it on another
            # activator of the fleet; a lone activator's Envoy answers 503.
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers: dict[str, str] = {}
        for name, value in received.headers or ():
            headers.setdefault(_text(name).lower(), _text(value))
        authority = headers.get(":authority") or headers.get("host", "")
        # The lookup may ask the control plane (a refresh on a miss): never in this
        # callback, which holds up every stream of the connection.
        task = asyncio.get_running_loop().create_task(
            self._serve(stream_id, authority, headers.get(":path", ""),
                        headers.get("content-type", ""), headers.get(SERVICE_HEADER),
                        headers.get(VERSION_HEADER)),
            name=f"h2-stream-{stream_id}")
        self._streams[stream_id] = task
        self._holder._track(task)

    async def _serve(self, stream_id: int, authority: str, path: str,
                     content_type: str, named: str | None = None,
                     version: str | None = None) -> None:
        name = ""
        try:
            service = await self._holder._lookup(authority, path or "/", named, version)
            if service is None:
                event(log, "activator.unknown_host", host=authority, path=path)
                answer = unknown_host(authority)
            else:
                name = service.name
                answer = await self._holder.wait_ready(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the stream hanging
            log.exception("activator.h2.hold_failed", extra={"service": name,
                                                             "host": authority})
            answer = internal_error(str(exc))
        if self._streams.get(stream_id) is asyncio.current_task():
            del self._streams[stream_id]
            self._answer(stream_id, answer, content_type)

    # sending

    def _answer(self, stream_id: int, answer: Answer, content_type: str) -> None:
        if self._closed:
            return
        headers, body = render(answer, content_type)
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not body)
        except ProtocolError as exc:  # reset or connection closing meanwhile
            event(log, "activator.h2.answer_dropped", stream=stream_id, error=str(exc))
            return
        if body:
            self._unsent[stream_id] = body
            self._send_unsent(stream_id)
        self._flush()

    def _send_unsent(self, stream_id: int) -> None:
        """Send as much of the stream's unsent body as the peer's windows allow."""
        body = self._unsent.pop(stream_id, b"")
        try:
            while body:
                size = min(self._h2.local_flow_control_window(stream_id),
                           self._h2.max_outbound_frame_size)
                if size <= 0:
                    self._unsent[stream_id] = body  # goes on at the next WINDOW_UPDATE
                    return
                chunk, body = body[:size], body[size:]
                self._h2.send_data(stream_id, chunk, end_stream=not body)
        except ProtocolError:
            return  # the stream was reset meanwhile: nothing left to say on it

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Refuse the held streams, say GOAWAY and close (H2Holder.stop)."""
        if self._closed:
            return
        for stream_id, task in list(self._streams.items()):
            task.cancel()
            try:
                self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            except ProtocolError:
                pass
        self._streams.clear()
        try:
            self._h2.close_connection(ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass
        self._flush()
        self._close_transport()

    def _close_transport(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
