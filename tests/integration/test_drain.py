"""Graceful drain of `torpor up` (a real Envoy, local model servers): SIGTERM with requests
held on a sleeping service.

(a) the wake finishes within the drain grace: every held request gets its 200 from the
service, and `torpor up` exits 0; (b) the wake takes longer than the grace: every held
request gets 503 + Retry-After (none cut), and the process exits within grace + a few
seconds; (c) a request sent after SIGTERM is refused at once (connection refused or 503),
not held; a second signal ends the grace at once; gRPC calls held on the h2 holder are
replayed when woken within the grace, answered UNAVAILABLE when not; (d) a request to an
awake service still in flight at SIGTERM is answered whole before Envoy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns, processes_mentioning
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

HELD = 20


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Up, Config]]]]:
    """start_up(services_yaml, activator=...) runs `torpor up`; always stopped."""
    runs = UpRuns()

    async def start(services: str, activator: str) -> tuple[Up, Config]:
        path = write_config(tmp_path, services, activator=activator)
        return await runs.start(path), load_config(path)

    yield start
    await runs.stop_all()


def held_now(config: Config, name: str) -> float:
    """torpor_held_requests{service=name} from `up`'s metrics endpoint."""
    with urllib.request.urlopen(f"http://{config.control_plane.metrics}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(f'torpor_held_requests{{service="{name}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def asleep_with_held(config: Config, name: str,
                           session: aiohttp.ClientSession) -> list[asyncio.Task[Any]]:
    """Hibernate `name`, send HELD requests on their own connections, and return once the
    activator holds them all."""
    await asyncio.to_thread(admin_client.hibernate, admin_target(config), name)
    await wait_until(lambda: not processes_mentioning(f"--name {name} "), 15, "no replica")

    async def one(i: int) -> tuple[int, bytes, dict[str, str]]:
        async with session.get(f"http://{config.gateway.listen}/predict?text=good{i}",
                               headers={"Host": f"{name}.localhost"}) as r:
            return r.status, await r.read(), dict(r.headers)

    tasks = [asyncio.create_task(one(i)) for i in range(HELD)]
    try:
        await wait_until(lambda: held_now(config, name) == HELD, 15, f"{HELD} held requests",
                         interval=0.05)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return tasks


async def refused_after_sigterm(up: Up, config: Config, name: str) -> None:
    """(c): once `up` says it drains, a new request is refused or answered 503 at once."""
    await wait_until(lambda: "torpor: draining" in up.text(), 10, "up to start draining")
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as fresh, \
                fresh.get(f"http://{config.gateway.listen}/predict?text=late",
                          headers={"Host": f"{name}.localhost"}) as r:
            assert r.status == 503, await r.text()
            assert json.loads(await r.read())["error"] == "draining"
    except aiohttp.ClientConnectorError:
        pass  # Envoy's listener is closed: connection refused
    assert time.monotonic() - started < 2.0


def session() -> aiohttp.ClientSession:
    # One connection per request (no pool limit), none reused after SIGTERM.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def test_sigterm_lets_held_requests_finish(start_up: Any) -> None:
    up, config = await start_up(model_service("drowsy", 1, load_seconds=2.0),
                                "wake_timeout: 30s, drain_grace: 20s")
    async with session() as client:
        tasks = await asleep_with_held(config, "drowsy", client)
        assert up.proc is not None
        up.proc.send_signal(signal.SIGTERM)
        await refused_after_sigterm(up, config, "drowsy")
        results = await asyncio.gather(*tasks)
    for code, body, headers in results:
        assert code == 200, body[:300]
        assert json.loads(body)["label"] == "positive"
        assert int(headers["x-torpor-cold-start-ms"]) >= 1000  # it waited for the wake
    assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]
    assert not processes_mentioning("--name drowsy ")


@contextlib.asynccontextmanager
async def echo_in_flight(client: aiohttp.ClientSession, config: Config, name: str,
                         rest: asyncio.Event) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST /echo to the awake `name` with a body whose first part goes at once and whose
    rest ("last") only once `rest` is set; yields the response once the first part has
    come back through Envoy from the replica: a request in flight."""

    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        await rest.wait()
        yield b"last"

    async with client.post(f"http://{config.gateway.listen}/echo", data=body(),
                           headers={"Host": f"{name}.localhost"}) as r:
        assert r.status == 200
        assert await r.content.readexactly(6) == b"first "
        yield r


async def test_sigterm_lets_requests_to_active_services_finish(start_up: Any) -> None:
    """A request already on its way to an awake replica (its body still being sent) when
    SIGTERM comes is answered whole: Envoy is stopped only once it answers nothing."""
    up, config = await start_up(model_service("brisk", 1), "drain_grace: 20s")
    rest_of_body = asyncio.Event()
    async with session() as client, \
            echo_in_flight(client, config, "brisk", rest_of_body) as r:
        assert up.proc is not None
        up.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "request(s) still in flight through Envoy" in up.text(), 10,
                         "up to wait for the request in flight")
        rest_of_body.set()
        assert await r.read() == b"last"
    assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]
    assert "are cut" not in up.text()


async def test_a_request_longer_than_the_grace_is_cut_when_it_ends(start_up: Any) -> None:
    grace = 2.0
    up, config = await start_up(model_service("chatty", 1), f"drain_grace: {grace:g}s")
    async with session() as client, \
            echo_in_flight(client, config, "chatty", asyncio.Event()) as r:
        assert up.proc is not None
        signalled = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # cut: the chunked body never ends
        cut = time.monotonic() - signalled
    assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]
    assert grace - 0.5 <= cut < grace + 5, cut
    assert "drain grace over: 1 request(s) in flight through Envoy are cut" in up.text()


async def test_wake_longer_than_grace_answers_503(start_up: Any) -> None:
    grace = 3.0
    up, config = await start_up(model_service("sloth", 1, load_seconds=15.0),
                                f"wake_timeout: 60s, drain_grace: {grace:g}s")
    async with session() as client:
        tasks = await asleep_with_held(config, "sloth", client)
        assert up.proc is not None
        signalled = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        await refused_after_sigterm(up, config, "sloth")
        results = await asyncio.gather(*tasks)  # a cut connection raises here
        answered = time.monotonic() - signalled
        assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]
        exited = time.monotonic() - signalled
    for code, body, headers in results:
        assert code == 503, body[:300]
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["error"] == "draining"
    assert grace - 0.5 <= answered < grace + 3, answered
    assert exited < grace + 8, exited
    assert not processes_mentioning("--name sloth ")


async def test_second_signal_ends_the_grace(start_up: Any) -> None:
    up, config = await start_up(model_service("dozy", 1, load_seconds=10.0),
                                "wake_timeout: 60s, drain_grace: 60s")
    async with session() as client:
        tasks = await asleep_with_held(config, "dozy", client)
        assert up.proc is not None
        up.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "torpor: draining" in up.text(), 10, "up to start draining")
        assert not any(task.done() for task in tasks)  # held through the drain
        again = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        results = await asyncio.gather(*tasks)
        answered = time.monotonic() - again
        assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]
    for code, body, headers in results:
        assert code == 503, body[:300]
        assert headers["Retry-After"] == "1" and json.loads(body)["error"] == "draining"
    assert answered < 3, answered  # not the 60 s grace, nor the 10 s wake
    assert "received SIGINT again: answering held requests now" in up.text()


GRPC_ECHO = Path(__file__).resolve().parents[1] / "support" / "grpc_echo.py"


def grpc_service(name: str, load_seconds: float) -> str:
    return f"""  - name: {name}
    host: {name}.localhost
    replicas: 1
    protocol: http2
    local:
      command: [{sys.executable}, {GRPC_ECHO}, --port, "{{port}}", --name, {name},
                --load-seconds, "{load_seconds}"]
      ready_probe: tcp
      stop_grace: 5s
"""


def no_replica(name: str) -> bool:
    return not processes_mentioning(f"--name {name} ")


async def test_grpc_streams_drain_on_the_h2_holder(start_up: Any) -> None:
    """Held gRPC calls: woken within the grace → replayed by Envoy to the replica; still
    held at its end → UNAVAILABLE with the drain's message (never a reset stream)."""
    grace = 6.0
    up, config = await start_up(grpc_service("gquick", 1.5) + grpc_service("gslow", 20.0),
                                f"wake_timeout: 60s, drain_grace: {grace:g}s")
    target = str(config.gateway.listen)

    async def call(name: str, payload: bytes) -> bytes | grpc.aio.AioRpcError:
        options = [("grpc.default_authority", f"{name}.localhost"), ("grpc.enable_retries", 0)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            say = channel.unary_unary("/torpor.test.Echo/Say")
            try:
                return bytes(await say(payload, timeout=40))
            except grpc.aio.AioRpcError as exc:
                return exc

    for name in ("gquick", "gslow"):
        await asyncio.to_thread(admin_client.hibernate, admin_target(config),
                                name)
        await wait_until(functools.partial(no_replica, name), 15, f"no {name} replica")
    calls = [asyncio.create_task(call(name, f"{name}-{i}".encode()))
             for name in ("gquick", "gslow") for i in range(10)]
    try:
        await wait_until(lambda: held_now(config, "gquick") == held_now(config, "gslow") == 10,
                         15, "10 held calls on each service", interval=0.05)
    except BaseException:
        for task in calls:
            task.cancel()
        raise
    assert up.proc is not None
    up.proc.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*calls)
    assert await asyncio.to_thread(up.proc.wait, 30) == 0, up.text()[-3000:]

    assert results[:10] == [f"gquick:gquick-{i}".encode() for i in range(10)]
    for result in results[10:]:
        assert isinstance(result, grpc.aio.AioRpcError), result
        assert result.code() is grpc.StatusCode.UNAVAILABLE, result
        assert "drain grace" in (result.details() or ""), result.details()
