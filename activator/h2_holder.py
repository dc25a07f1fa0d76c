"""HTTP/2 (h2c, prior knowledge) front of the activator: DESIGN.md's second way to answer a
held request, for services whose Envoy cluster speaks HTTP/2 (gRPC above all).

Owns: the HTTP/2 connections Envoy opens to the activator (one `h2` state machine each, many
request streams multiplexed on it), finding each stream's service by `:authority` (or `host`),
holding the stream (bounded by holding.py, at most `wake_timeout`) until the service is awake
and `after_wake` confirms that Envoy's endpoints have flipped back, and then answering it with
a headers-only 503 carrying RETRY_HEADER. Envoy's route retry policy (`retry_on:
retriable-headers`, `retriable_headers: [x-torpor-retry]`) turns that answer into a replay of
the request, from Envoy's own buffer, to the now-ready replicas: the real response never
passes through Python.

Must not: proxy or keep request bodies (DATA is acknowledged for flow control and dropped;
Envoy keeps its own copy for the retry), wake (waker.py) or bound queues (holding.py) itself,
put the retry marker on any answer but "the service is ready now", or answer a stream whose
client reset it or went away (it leaves its queue, counted as abandoned "disconnected").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

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

from activator.handler import RETRY_AFTER_SECONDS
from activator.holding import HeldRequests, QueueFullError, abandoned
from activator.waker import Wakes
from torpor.config import ServiceConfig
from torpor.errors import TorporError, UnknownServiceError, WakeFailedError
from torpor.logs import event

log = logging.getLogger("torpor.activator")

#: Response header that marks "ready now, replay me". Envoy's route for an HTTP/2 service
#: has retry_policy {retry_on: retriable-headers, retriable_headers: [{name: x-torpor-retry}]}.
RETRY_HEADER = "x-torpor-retry"
#: Streams one Envoy connection may hold open at once (h2's default is 100; Envoy opens
#: another connection when a connection is full).
MAX_CONCURRENT_STREAMS = 1000
#: Largest request header block accepted (h2's default, advertised to the peer).
MAX_HEADER_LIST_SIZE = 65536

# gRPC status codes used in answers (grpc/doc/statuscodes.md).
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a request stream gets: an HTTP status, its gRPC equivalent and a message."""

    status: int
    grpc_status: int
    message: str
    retry: bool = False  # carries RETRY_HEADER: Envoy replays the request to the replicas
    retry_after: bool = False  # carries retry-after: the client may try again shortly


#: The one answer that carries the retry marker: the service is awake, the flip confirmed.
READY = Answer(503, GRPC_UNAVAILABLE, "waking", retry=True)


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

    def __init__(self, lookup: Callable[[str], ServiceConfig | None], waker: Wakes,
                 held: HeldRequests, wake_timeout: float,
                 after_wake: Callable[[str], Awaitable[None]] | None = None,
                 on_held: Callable[[str], None] | None = None) -> None:
        self._lookup = lookup
        self._waker = waker
        self._held = held
        self._wake_timeout = wake_timeout
        self._after_wake = after_wake
        self._on_held = on_held or (lambda name: None)
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

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_ready(self, name: str) -> Answer:
        """Hold one request of `name` until its service is awake and the flip confirmed, and
        say how to answer it. Raises CancelledError (counted as abandoned "disconnected")
        when the stream goes away meanwhile."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        phase = "wake"
        try:
            with self._held.slot(name):
                try:
                    async with asyncio.timeout(self._wake_timeout):
                        await self._waker.wake(name, "first request")
                        phase = "flip"
                        if self._after_wake is not None:
                            await self._after_wake(name)
                except asyncio.CancelledError:
                    abandoned(name, "disconnected")
                    event(log, "activator.h2.client_gone", service=name, phase=phase,
                          waited=round(loop.time() - arrived, 3))
                    raise
        except QueueFullError as exc:
            event(log, "activator.h2.queue_full", service=name, level=logging.WARNING)
            return Answer(503, GRPC_UNAVAILABLE, str(exc), retry_after=True)
        except TimeoutError:
            abandoned(name, "deadline")
            event(log, "activator.h2.deadline", service=name, phase=phase, level=logging.WARNING,
                  waited=round(loop.time() - arrived, 3))
            if phase == "wake":
                message = (f"service {name!r} did not become ready within "
                           f"{self._wake_timeout:g}s")
            else:
                message = (f"service {name!r} is ready but the gateway did not confirm its "
                           f"route within {self._wake_timeout:g}s")
            return Answer(504, GRPC_DEADLINE_EXCEEDED, message, retry_after=True)
        except WakeFailedError as exc:
            timed_out = exc.outcome == "timeout"
            abandoned(name, "deadline" if timed_out else "failed")
            event(log, "activator.h2.wake_failed", service=name, outcome=exc.outcome,
                  error=str(exc), level=logging.WARNING)
            if timed_out:
                return Answer(504, GRPC_DEADLINE_EXCEEDED, str(exc), retry_after=True)
            return Answer(503, GRPC_UNAVAILABLE, str(exc), retry_after=True)
        except UnknownServiceError as exc:
            event(log, "activator.h2.unknown_service", service=name, level=logging.WARNING)
            return Answer(404, GRPC_NOT_FOUND, str(exc))
        except TorporError as exc:  # after_wake failed: the flip is not confirmed
            abandoned(name, "failed")
            event(log, "activator.h2.flip_failed", service=name, error=str(exc),
                  level=logging.WARNING)
            return Answer(503, GRPC_UNAVAILABLE, f"service {name!r} is ready but the gateway "
                                                 f"did not confirm its route: {exc}",
                          retry_after=True)
        event(log, "activator.h2.replay", service=name,
              waited=round(loop.time() - arrived, 3))
        return READY


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
        headers: dict[str, str] = {}
        for name, value in received.headers or ():
            headers.setdefault(_text(name).lower(), _text(value))
        authority = headers.get(":authority") or headers.get("host", "")
        content_type = headers.get("content-type", "")
        service = self._holder._lookup(authority)
        if service is None:
            event(log, "activator.h2.unknown_host", host=authority, path=headers.get(":path"))
            self._answer(stream_id, Answer(
                404, GRPC_NOT_FOUND,
                f"no torpor service is configured for host {authority!r}"), content_type)
            return
        self._holder._on_held(service.name)
        task = asyncio.get_running_loop().create_task(
            self._hold(stream_id, service.name, content_type),
            name=f"h2-hold-{service.name}-{stream_id}")
        self._streams[stream_id] = task
        self._holder._track(task)

    async def _hold(self, stream_id: int, name: str, content_type: str) -> None:
        try:
            answer = await self._holder.wait_ready(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the stream hanging
            log.exception("activator.h2.hold_failed", extra={"service": name})
            answer = Answer(500, GRPC_INTERNAL, f"activator error: {exc}")
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
