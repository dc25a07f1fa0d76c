"""activator/h2_holder.py against real HTTP/2 clients on loopback.

The holder runs with a fake waker (its wake() awaits a future the test resolves) and a real
HeldRequests. Clients are grpcio (a real h2c prior-knowledge gRPC client) and the `h2`
library over asyncio streams, where exact response headers matter. "Not answered yet" is
proven with a PING round trip on the raw client: the server writes in order, so anything
it had sent on a stream arrives before the PING's ACK. Every wait has a deadline; no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from prometheus_client import REGISTRY

from activator.h2_holder import RETRY_HEADER, H2Holder, grpc_message
from activator.holding import HeldRequests, Holding, Lookup, ServiceLookup
from torpor.config import ServiceConfig
from torpor.errors import TorporError, WakeFailedError
from torpor.model import Endpoint

DEADLINE = 5.0
METHOD = "/pkg.Svc/Method"
SERVICES = {s.host: s for s in (ServiceConfig(name="svc", host="svc.localhost"),
                                ServiceConfig(name="other", host="other.localhost"))}


def lookup(authority: str) -> ServiceConfig | None:
    return SERVICES.get(authority.rsplit(":", 1)[0].lower())


def abandoned_count(name: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("torpor_held_abandoned_total",
                                      {"service": name, "reason": reason})
    return value or 0.0


class FakeWaker:
    """Every caller of wake(name) awaits the same per-name outcome, which the test sets."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self._outcomes: dict[str, asyncio.Future[tuple[Endpoint, ...]]] = {}
        self._changed = asyncio.Condition()

    def outcome(self, name: str) -> asyncio.Future[tuple[Endpoint, ...]]:
        if name not in self._outcomes:
            self._outcomes[name] = asyncio.get_running_loop().create_future()
        return self._outcomes[name]

    def wake_up(self, name: str) -> None:
        self.outcome(name).set_result((Endpoint("127.0.0.1", 1),))

    def fail(self, name: str, exc: BaseException) -> None:
        self.outcome(name).set_exception(exc)

    async def wake(self, name: str, reason: str) -> tuple[Endpoint, ...]:
        assert reason == "first request"
        async with self._changed:
            self.calls.append(name)
            self._changed.notify_all()
        try:
            return await asyncio.shield(self.outcome(name))
        except asyncio.CancelledError:
            self.cancelled.append(name)
            async with self._changed:
                self._changed.notify_all()
            raise

    async def until(self, predicate: Callable[[], bool]) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)
        await asyncio.wait_for(wait(), DEADLINE)


class AfterWake:
    """The control plane's "flip ACKed by every Envoy": blocks until `release` is set."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.block = False

    async def __call__(self, name: str) -> None:
        self.order.append(f"after_wake {name} entered")
        self.entered.set()
        if self.block:
            await self.release.wait()
        self.order.append(f"after_wake {name} returned")


class RawClient:
    """An HTTP/2 prior-knowledge client made of `h2` and asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.responses: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.pings: set[bytes] = set()
        self.terminated: ConnectionTerminated | None = None
        self.eof = False
        self.order: list[str] | None = None  # when set, "answered <id>" is appended
        self._ping = 0

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), DEADLINE)
        client = cls(reader, writer)
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            await self.writer.drain()

    async def request(self, authority: str | None, *, grpc_call: bool = True,
                      body: bytes = b"", end: bool = True,
                      extra: list[tuple[str, str]] | None = None) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", METHOD)]
        if authority is not None:
            headers.append((":authority", authority))
        headers += extra or []
        if grpc_call:
            headers += [("content-type", "application/grpc"), ("te", "trailers")]
        self.h2.send_headers(stream_id, headers, end_stream=end and not body)
        await self.flush()
        if body:
            await self.send_body(stream_id, body, end=end)
        return stream_id

    async def send_body(self, stream_id: int, body: bytes, *, end: bool) -> None:
        """Send `body` within the server's flow-control windows, reading its updates."""
        while body:
            size = min(self.h2.local_flow_control_window(stream_id),
                       self.h2.max_outbound_frame_size)
            if size <= 0:
                await self.read_once()
                continue
            chunk, body = body[:size], body[size:]
            self.h2.send_data(stream_id, chunk, end_stream=end and not body)
            await self.flush()

    async def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        await self.flush()

    async def read_once(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), DEADLINE)
        if not data:
            self.eof = True
            return
        for ev in self.h2.receive_data(data):
            if isinstance(ev, ResponseReceived):
                self.responses[ev.stream_id] = {str(k): str(v) for k, v in ev.headers}
                if self.order is not None:
                    self.order.append(f"answered {ev.stream_id}")
                if ev.stream_ended is not None:
                    self.ended.add(ev.stream_id)
            elif isinstance(ev, DataReceived):
                self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, TrailersReceived):
                raise AssertionError(f"unexpected trailers on stream {ev.stream_id}")
            elif isinstance(ev, StreamReset):
                self.resets[ev.stream_id] = int(ev.error_code)
            elif isinstance(ev, PingAckReceived):
                self.pings.add(ev.ping_data)
            elif isinstance(ev, ConnectionTerminated):
                self.terminated = ev
        await self.flush()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async def read() -> None:
            while not predicate():
                if self.eof:
                    raise AssertionError("connection closed before the condition held")
                await self.read_once()
        await asyncio.wait_for(read(), DEADLINE)

    async def round_trip(self) -> None:
        """PING and wait for its ACK: whatever the server sent before has been read."""
        self._ping += 1
        data = self._ping.to_bytes(8, "big")
        self.h2.ping(data)
        await self.flush()
        await self.until(lambda: data in self.pings)

    async def answer(self, stream_id: int) -> dict[str, str]:
        await self.until(lambda: stream_id in self.ended or stream_id in self.resets)
        assert stream_id in self.responses, f"stream {stream_id} reset: {self.resets}"
        return self.responses[stream_id]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), DEADLINE)


class Harness:
    def __init__(self) -> None:
        self.order: list[str] = []
        self.waker = FakeWaker()
        self.held = HeldRequests(max_per_service=100)
        self.after_wake = AfterWake(self.order)
        self.held_names: list[str] = []
        self.holder: H2Holder | None = None
        self.port = 0
        self._clients: list[RawClient] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, wake_timeout: float = 30.0, max_held: int = 100,
                    after_wake: Callable[[str], Awaitable[None]] | None = None,
                    find: Lookup | None = None) -> H2Holder:
        self.held = HeldRequests(max_per_service=max_held)
        holding = Holding(self.held, self.waker, wake_timeout, on_held=self.held_names.append)
        self.holder = H2Holder(find or ServiceLookup(lambda host, path: lookup(host)), holding,
                               after_wake=after_wake or self.after_wake)
        self.port = await asyncio.wait_for(self.holder.start("127.0.0.1", 0), DEADLINE)
        return self.holder

    async def raw(self) -> RawClient:
        client = await RawClient.open(self.port)
        self._clients.append(client)
        return client

    def channel(self, authority: str = "svc.localhost") -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.default_authority", authority),
                                               ("grpc.enable_retries", 0)])
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            await asyncio.wait_for(channel.close(), DEADLINE)
        for client in self._clients:
            await client.close()
        if self.holder is not None:
            await asyncio.wait_for(self.holder.stop(), DEADLINE)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


def unary(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, DEADLINE)
    return info.value


# --- unknown host ----------------------------------------------------------------------------


async def test_unknown_authority_is_grpc_not_found(harness: Harness) -> None:
    await harness.start()
    err = await grpc_error(unary(harness.channel("nobody.localhost"))(b"x", timeout=DEADLINE))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "no torpor service is configured for host 'nobody.localhost'" in (err.details() or "")
    assert harness.waker.calls == [] and harness.held_names == []


async def test_unknown_authority_raw(harness: Harness) -> None:
    await harness.start()
    client = await harness.raw()
    grpc_stream = await client.request("nobody.localhost:8080")
    plain_stream = await client.request("nobody.localhost", grpc_call=False)
    headers = await client.answer(grpc_stream)
    assert headers[":status"] == "404"
    assert headers["content-type"] == "application/grpc"
    assert headers["grpc-status"] == "5"
    assert "no torpor service" in headers["grpc-message"]
    assert RETRY_HEADER not in headers
    assert grpc_stream not in client.bodies  # trailers-only: no body a gRPC client would parse

    headers = await client.answer(plain_stream)
    assert headers[":status"] == "404"
    assert "grpc-status" not in headers and RETRY_HEADER not in headers
    assert headers["content-type"].startswith("text/plain")
    body = client.bodies[plain_stream].decode()
    assert body == "no torpor service is configured for host 'nobody.localhost'\n"
    assert headers["content-length"] == str(len(body))


async def test_unknown_authority_is_looked_up_again_after_a_refresh(harness: Harness) -> None:
    """A service discovered a moment ago is found on its first gRPC request; the refresh
    runs in the stream's task, so the connection's other streams go on meanwhile."""
    late = ServiceConfig(name="late", host="late.localhost")
    known = dict(SERVICES)
    refreshes: list[str] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def on_miss() -> None:
        refreshes.append("refresh")
        entered.set()
        await release.wait()
        known[late.host] = late

    def by_host(authority: str) -> ServiceConfig | None:
        return known.get(authority.rsplit(":", 1)[0].lower())

    await harness.start(find=ServiceLookup(lambda host, path: by_host(host), on_miss))
    client = await harness.raw()
    late_stream = await client.request("late.localhost:8080")
    await asyncio.wait_for(entered.wait(), DEADLINE)

    harness.waker.wake_up("svc")  # a known service is answered while the refresh runs
    assert (await client.answer(await client.request("svc.localhost")))[RETRY_HEADER] == "1"
    assert late_stream not in client.responses

    release.set()
    await harness.waker.until(lambda: "late" in harness.waker.calls)
    harness.waker.wake_up("late")
    headers = await client.answer(late_stream)
    assert headers[":status"] == "503" and headers[RETRY_HEADER] == "1"
    assert refreshes == ["refresh"] and harness.held_names == ["svc", "late"]

    nobody = await client.request("nobody.localhost")  # still unknown after a refresh
    headers = await client.answer(nobody)
    assert headers[":status"] == "404" and headers["grpc-status"] == "5"
    assert refreshes == ["refresh", "refresh"]


# --- held, then "replay me" ------------------------------------------------------------------


async def test_held_until_woken_and_flip_confirmed(harness: Harness) -> None:
    await harness.start()
    harness.after_wake.block = True
    client = await harness.raw()
    client.order = harness.order
    stream = await client.request("svc.localhost:8080")
    await harness.waker.until(lambda: harness.waker.calls == ["svc"])
    assert harness.held.count("svc") == 1 and harness.held_names == ["svc"]

    await client.round_trip()
    assert stream not in client.responses  # held while the service sleeps

    harness.waker.wake_up("svc")
    await asyncio.wait_for(harness.after_wake.entered.wait(), DEADLINE)
    await client.round_trip()
    assert stream not in client.responses  # woken, but the flip is not confirmed yet

    harness.after_wake.release.set()
    headers = await client.answer(stream)
    assert harness.order == ["after_wake svc entered", "after_wake svc returned",
                             f"answered {stream}"]
    assert stream in client.ended and stream not in client.bodies  # headers-only, END_STREAM
    assert headers == {":status": "503", RETRY_HEADER: "1", "content-type": "application/grpc",
                       "grpc-status": "14", "grpc-message": "waking"}
    assert harness.held.count("svc") == 0


async def test_plain_http2_request_gets_the_retry_marker_too(harness: Harness) -> None:
    await harness.start()
    harness.waker.wake_up("svc")
    client = await harness.raw()
    # No :authority: the host header is used instead.
    stream = await client.request(None, grpc_call=False, extra=[("host", "svc.localhost")])
    headers = await client.answer(stream)
    assert headers[":status"] == "503" and headers[RETRY_HEADER] == "1"
    assert "content-type" not in headers and stream not in client.bodies
    assert harness.held_names == ["svc"]


async def test_grpc_call_is_held_then_told_to_retry(harness: Harness) -> None:
    await harness.start()
    harness.after_wake.block = True
    call = unary(harness.channel())(b"request", timeout=DEADLINE)
    await harness.waker.until(lambda: harness.waker.calls == ["svc"])
    harness.waker.wake_up("svc")
    await asyncio.wait_for(harness.after_wake.entered.wait(), DEADLINE)
    assert not call.done()
    harness.after_wake.release.set()
    err = await grpc_error(call)
    assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details() == "waking"
    metadata = dict(err.trailing_metadata() or ()) | dict(err.initial_metadata() or ())
    assert metadata.get(RETRY_HEADER) == "1"
    assert harness.order[-1] == "after_wake svc returned"


async def test_request_body_is_acknowledged_and_dropped(harness: Harness) -> None:
    await harness.start()
    client = await harness.raw()
    body = bytes(range(256)) * 1024  # 256 KiB: four times the initial window
    stream = await client.request("svc.localhost", body=body)  # needs the server's acks
    await harness.waker.until(lambda: harness.waker.calls == ["svc"])
    harness.waker.wake_up("svc")
    headers = await client.answer(stream)
    assert headers[RETRY_HEADER] == "1"


async def test_many_streams_on_one_connection(harness: Harness) -> None:
    await harness.start()
    client = await harness.raw()
    client.order = harness.order
    svc_streams = [await client.request("svc.localhost") for _ in range(40)]
    other_streams = [await client.request("other.localhost") for _ in range(10)]
    await harness.waker.until(lambda: len(harness.waker.calls) == 50)
    assert harness.waker.calls.count("svc") == 40 and harness.waker.calls.count("other") == 10
    assert harness.held.count("svc") == 40 and harness.held.count("other") == 10

    harness.waker.wake_up("other")
    for stream in other_streams:
        assert (await client.answer(stream))[RETRY_HEADER] == "1"
    await client.round_trip()
    assert not any(s in client.responses for s in svc_streams)
    assert harness.held.count("svc") == 40 and harness.held.count("other") == 0

    harness.waker.wake_up("svc")
    for stream in svc_streams:
        assert (await client.answer(stream))[RETRY_HEADER] == "1"
    assert harness.held.total() == 0


async def test_many_concurrent_grpc_calls(harness: Harness) -> None:
    await harness.start()
    method = unary(harness.channel())
    calls = [method(b"%d" % i, timeout=DEADLINE) for i in range(30)]
    await harness.waker.until(lambda: len(harness.waker.calls) == 30)
    assert harness.held.count("svc") == 30
    harness.waker.wake_up("svc")
    for call in calls:
        err = await grpc_error(call)
        assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details() == "waking"
    assert harness.held.count("svc") == 0


# --- refused, timed out, failed --------------------------------------------------------------


async def test_queue_full_is_503_without_the_retry_marker(harness: Harness) -> None:
    await harness.start(max_held=1)
    client = await harness.raw()
    first = await client.request("svc.localhost")
    await harness.waker.until(lambda: harness.waker.calls == ["svc"])
    second = await client.request("svc.localhost")
    headers = await client.answer(second)
    assert headers[":status"] == "503" and headers["retry-after"] == "1"
    assert headers["grpc-status"] == "14" and RETRY_HEADER not in headers
    assert "already has 1 requests waiting" in headers["grpc-message"]
    assert harness.waker.calls == ["svc"] and first not in client.responses

    harness.waker.wake_up("svc")
    assert (await client.answer(first))[RETRY_HEADER] == "1"


async def test_wake_timeout_is_504_deadline_exceeded(harness: Harness) -> None:
    await harness.start(wake_timeout=0.05)
    before = abandoned_count("svc", "deadline")
    err = await grpc_error(unary(harness.channel())(b"x", timeout=DEADLINE))
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.details() == "service 'svc' did not become ready within 0.05s"

    client = await harness.raw()
    stream = await client.request("svc.localhost")
    headers = await client.answer(stream)
    assert headers[":status"] == "504" and headers["grpc-status"] == "4"
    assert headers["grpc-message"] == grpc_message(
        "service 'svc' did not become ready within 0.05s")
    assert RETRY_HEADER not in headers
    assert harness.held.count("svc") == 0
    assert abandoned_count("svc", "deadline") == before + 2
    assert harness.order == []  # after_wake never ran


async def test_wake_failures(harness: Harness) -> None:
    await harness.start()
    harness.waker.fail("svc", WakeFailedError("svc: not ready in 120s", "timeout"))
    harness.waker.fail("other", WakeFailedError("other: lock busy", "failed"))
    client = await harness.raw()
    timed_out = await client.request("svc.localhost")
    failed = await client.request("other.localhost")
    headers = await client.answer(timed_out)
    assert headers[":status"] == "504" and headers["grpc-status"] == "4"
    assert RETRY_HEADER not in headers
    headers = await client.answer(failed)
    assert headers[":status"] == "503" and headers["grpc-status"] == "14"
    assert headers["grpc-message"] == "other: lock busy" and RETRY_HEADER not in headers
    assert harness.held.total() == 0 and harness.order == []


async def test_unconfirmed_flip_is_not_retried(harness: Harness) -> None:
    await harness.start(wake_timeout=0.05)
    harness.after_wake.block = True  # never released: the flip is never confirmed
    harness.waker.wake_up("svc")
    client = await harness.raw()
    stream = await client.request("svc.localhost")
    headers = await client.answer(stream)
    assert headers[":status"] == "504" and headers["grpc-status"] == "4"
    assert "did not confirm its route within 0.05s" in headers["grpc-message"]
    assert RETRY_HEADER not in headers and harness.held.count("svc") == 0


async def test_failed_flip_is_503_without_the_retry_marker(harness: Harness) -> None:
    async def refuse(name: str) -> None:
        raise TorporError("envoy-2 did not ACK")

    await harness.start(after_wake=refuse)
    harness.waker.wake_up("svc")
    client = await harness.raw()
    headers = await client.answer(await client.request("svc.localhost"))
    assert headers[":status"] == "503" and headers["grpc-status"] == "14"
    assert "envoy-2 did not ACK" in headers["grpc-message"] and RETRY_HEADER not in headers


def test_grpc_message_is_percent_encoded() -> None:
    assert grpc_message("waking") == "waking"
    assert grpc_message("100% ready") == "100%25 ready"
    assert grpc_message("é\n") == "%C3%A9%0A"


# --- the client goes away --------------------------------------------------------------------


async def test_reset_stream_leaves_the_queue_unanswered(harness: Harness) -> None:
    await harness.start()
    client = await harness.raw()
    before = abandoned_count("svc", "disconnected")
    gone = await client.request("svc.localhost")
    stays = await client.request("svc.localhost")
    await harness.waker.until(lambda: len(harness.waker.calls) == 2)
    assert harness.held.count("svc") == 2

    await client.reset(gone)
    await harness.waker.until(lambda: harness.waker.cancelled == ["svc"])
    assert harness.held.count("svc") == 1
    assert abandoned_count("svc", "disconnected") == before + 1

    harness.waker.wake_up("svc")
    assert (await client.answer(stays))[RETRY_HEADER] == "1"
    await client.round_trip()
    assert gone not in client.responses and gone not in client.resets
    assert harness.held.count("svc") == 0


async def test_cancelled_grpc_call_gives_its_slot_back(harness: Harness) -> None:
    await harness.start()
    before = abandoned_count("svc", "disconnected")
    call = unary(harness.channel())(b"x", timeout=DEADLINE)
    await harness.waker.until(lambda: harness.waker.calls == ["svc"])
    assert harness.held.count("svc") == 1
    call.cancel()
    await harness.waker.until(lambda: harness.waker.cancelled == ["svc"])
    assert harness.held.count("svc") == 0
    assert abandoned_count("svc", "disconnected") == before + 1
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, DEADLINE)
    harness.waker.wake_up("svc")
    assert harness.order == []


async def test_lost_connection_cancels_its_streams(harness: Harness) -> None:
    await harness.start()
    client = await harness.raw()
    for _ in range(3):
        await client.request("svc.localhost")
    await harness.waker.until(lambda: len(harness.waker.calls) == 3)
    await client.close()
    await harness.waker.until(lambda: len(harness.waker.cancelled) == 3)
    assert harness.held.count("svc") == 0
    harness.waker.wake_up("svc")
    assert harness.order == []


# --- stop ------------------------------------------------------------------------------------


async def test_stop_refuses_held_streams_and_closes(harness: Harness) -> None:
    holder = await harness.start()
    client = await harness.raw()
    streams = [await client.request("svc.localhost") for _ in range(3)]
    call = unary(harness.channel())(b"x", timeout=DEADLINE)
    await harness.waker.until(lambda: len(harness.waker.calls) == 4)
    assert harness.held.count("svc") == 4

    await asyncio.wait_for(holder.stop(), DEADLINE)
    assert harness.held.count("svc") == 0
    assert len(harness.waker.cancelled) == 4

    await client.until(lambda: client.eof)
    assert client.resets == dict.fromkeys(streams, ErrorCodes.REFUSED_STREAM)
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.NO_ERROR
    assert not client.responses
    err = await grpc_error(call)
    assert err.code() is grpc.StatusCode.UNAVAILABLE

    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", harness.port), DEADLINE)
    await asyncio.wait_for(holder.stop(), DEADLINE)  # idempotent
