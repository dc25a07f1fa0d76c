"""Hibernate and wake end to end, through `torpor up` with a real Envoy and model servers.

The whole loop: serve → idle → HIBERNATED (no process, recorded replicas kept) → a burst
of held requests all answered → ACTIVE again → silent → EVICTED (virtual host gone from
Envoy) → a request wakes it again. Then the ways a wake can go wrong: a service that never
gets ready, a full queue, a client that hangs up while held; and no failed request under
steady load across a hibernate and a wake.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns, processes_mentioning, status, status_json, wait_state
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target
from torpor.gateway import admin_session, admin_url

pytestmark = pytest.mark.envoy

FAST_POLICY = ("policy: {kind: fixed, idle_after: 5s, evict_after: 12s, creation_grace: 0s, "
               "check_every: 250ms}")


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Up, Config]]]]:
    """start_up(services_yaml, extra=..., activator=...) runs `torpor up`; always stopped."""
    runs = UpRuns()

    async def start(services: str, extra: str = "", activator: str = "wake_timeout: 30s"
                    ) -> tuple[Up, Config]:
        path = write_config(tmp_path, services, extra, activator)
        return await runs.start(path), load_config(path)

    yield start
    await runs.stop_all()




def replica_processes(name: str) -> list[str]:
    return processes_mentioning(f"--name {name} ")


async def send(session: aiohttp.ClientSession, config: Config, host: str, path: str,
               body: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    method = "POST" if body is not None else "GET"
    async with session.request(method, f"http://{config.gateway.listen}{path}", data=body,
                               headers={"Host": host}) as r:
        return r.status, await r.read(), dict(r.headers)


async def vhosts_in_envoy(config: Config) -> set[str]:
    url = admin_url(config.gateway.admin, "/config_dump?resource=dynamic_route_configs")
    async with admin_session(config.gateway.admin, 10) as session, session.get(url) as r:
        dump = await r.json()
    names: set[str] = set()
    for config_entry in dump.get("configs", []):
        for vhost in config_entry.get("route_config", {}).get("virtual_hosts", []):
            names.add(vhost["name"])
    return names


async def test_whole_loop_hibernate_wake_evict_wake(start_up: Any) -> None:
    up, config = await start_up(model_service("sleepy", 2, load_seconds=2.0), FAST_POLICY)
    async with aiohttp.ClientSession() as session:
        code, body, _ = await send(session, config, "sleepy.localhost", "/predict?text=good")
        assert code == 200, body

        # Idle → the policy hibernates it: no process left, two replicas recorded.
        hibernated = await wait_state(config, "sleepy", "HIBERNATED", 30)
        assert hibernated["replicas"] == 0 and hibernated["recorded_replicas"] == 2
        await wait_until(lambda: not replica_processes("sleepy"), 10, "no replica process")
        assert "sleepy" in await vhosts_in_envoy(config)  # the route stays (to the activator)

        # 50 concurrent requests, half with 4 KB bodies: held, one wake, all answered.
        bodies = [os.urandom(4096) if i % 2 else None for i in range(50)]
        started = time.monotonic()
        results = await asyncio.gather(*(
            send(session, config, "sleepy.localhost", "/echo" if b else "/predict?text=nice",
                 b) for b in bodies))
        waited = time.monotonic() - started
        for (code, answer, _), sent in zip(results, bodies, strict=True):
            assert code == 200, answer[:300]
            if sent is not None:
                assert hashlib.sha256(answer).digest() == hashlib.sha256(sent).digest()
            else:
                assert json.loads(answer)["label"] == "positive"
        cold = [int(h["x-torpor-cold-start-ms"]) for _, _, h in results
                if "x-torpor-cold-start-ms" in h]
        assert cold and max(cold) >= 1500, cold  # they waited for the 2 s load
        assert waited < 25

        awake = await wait_state(config, "sleepy", "ACTIVE", 10)
        assert awake["recorded_replicas"] == 2
        await wait_until(lambda: len(replica_processes("sleepy")) == 2, 10, "2 replicas")
        transitions = [h["to"] for h in awake["history"]]
        assert transitions[-5:] == ["ACTIVE", "HIBERNATING", "HIBERNATED", "WAKING", "ACTIVE"]

        # Silent → hibernated again, then evicted: its virtual host leaves Envoy.
        await wait_state(config, "sleepy", "EVICTED", 45)
        await wait_until(lambda: _gone(config), 10, "sleepy's vhost removed from Envoy")

        # A request for the evicted host comes through the catch-all and wakes it.
        code, body, headers = await send(session, config, "sleepy.localhost", "/echo", b"again")
        assert code == 200 and body == b"again", body
        assert "x-torpor-cold-start-ms" in headers
        await wait_state(config, "sleepy", "ACTIVE", 10)
        await wait_until(lambda: _present(config), 10, "sleepy's vhost back in Envoy")

        code, body, _ = await send(session, config, "nobody.localhost", "/predict")
        assert code == 404 and b"nobody.localhost" in body

    table = await asyncio.to_thread(status_json, up.config_path)
    history = next(s for s in table if s["name"] == "sleepy")["history"]
    assert "EVICTED" in [h["to"] for h in history]  # type: ignore[index]


async def _gone(config: Config) -> bool:
    return "sleepy" not in await vhosts_in_envoy(config)


async def _present(config: Config) -> bool:
    return "sleepy" in await vhosts_in_envoy(config)


async def test_no_request_fails_under_load_across_hibernate_and_wake(start_up: Any) -> None:
    up, config = await start_up(model_service("steady", 2, load_seconds=0.5))
    failures: list[str] = []
    answered = 0
    stop = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        try:
            code, body, _ = await send(session, config, "steady.localhost", "/echo", b"payload")
            if code != 200 or body != b"payload":
                failures.append(f"{code} {body[:200]!r}")
            answered += 1
        except aiohttp.ClientError as exc:
            failures.append(repr(exc))

    async def load() -> None:
        """50 requests/s, open loop (a slow answer does not slow the sending), until told
        to stop; then every request sent is awaited."""
        sent: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                sent.append(asyncio.create_task(one(session)))
                await asyncio.sleep(0.02)
            await asyncio.gather(*sent)

    load_task = asyncio.create_task(load())
    try:
        await wait_until(lambda: answered >= 25, 20, "load running")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "assembly.cli", "hibernate", "steady", "--config",
             str(up.config_path)], capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr.decode()
        # The load keeps coming: the activator holds it and wakes the service again.

        def woke_again(s: dict[str, Any]) -> bool:
            return [h["to"] for h in s["history"]][-4:] == ["HIBERNATING", "HIBERNATED",
                                                           "WAKING", "ACTIVE"]
        async def woken() -> bool:
            return woke_again(await asyncio.to_thread(status, config, "steady"))

        await wait_until(woken, 30, "wake after hibernate")
        before = answered
        await wait_until(lambda: answered >= before + 100, 20, "load served after the wake")
    finally:
        stop.set()
        await asyncio.wait_for(load_task, 30)
    assert not failures, failures[:10]
    final = await asyncio.to_thread(status, config, "steady")
    assert final["state"] == "ACTIVE" and final["replicas"] == 2


async def test_never_ready_gets_504_returns_to_hibernated_and_retries(start_up: Any) -> None:
    # replicas: 0 → nothing to wait for at start-up; a wake starts 1 that never loads.
    service = model_service("stuck", 0, load_seconds=3600)
    _, config = await start_up(service, activator="wake_timeout: 3s")
    api = admin_target(config)
    await asyncio.to_thread(admin_client.hibernate, api, "stuck")
    await wait_state(config, "stuck", "HIBERNATED", 10)

    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        results = await asyncio.gather(*(send(session, config, "stuck.localhost", "/predict")
                                         for _ in range(3)))
        waited = time.monotonic() - started
        for code, body, _ in results:
            assert code == 504, body
            assert b"did not become ready within 3s" in body
        assert 2.5 < waited < 15
        after = await wait_state(config, "stuck", "HIBERNATED", 10)
        assert [h["to"] for h in after["history"]][-2:] == ["WAKING", "HIBERNATED"]
        await wait_until(lambda: not replica_processes("stuck"), 10, "the replica stopped")

        code, body, _ = await send(session, config, "stuck.localhost", "/predict")  # tries again
        assert code == 504
        again = await wait_state(config, "stuck", "HIBERNATED", 10)
        assert [h["to"] for h in again["history"]].count("WAKING") == 2


async def test_full_queue_503_and_hang_up_is_not_proxied(start_up: Any) -> None:
    service = model_service("slow", 1, load_seconds=3.0, flags=", --log-requests")
    _, config = await start_up(service, activator="wake_timeout: 30s, max_held_per_service: 3")
    api = admin_target(config)
    await asyncio.to_thread(admin_client.hibernate, api, "slow")
    await wait_state(config, "slow", "HIBERNATED", 10)
    metrics_url = f"http://{config.control_plane.metrics}/metrics"

    async with aiohttp.ClientSession() as session:
        # A client that hangs up while held: raw socket, request sent, then closed.
        raw = socket.create_connection((config.gateway.listen.host, config.gateway.listen.port))
        raw.sendall(b"GET /predict?hangup-marker HTTP/1.1\r\nHost: slow.localhost\r\n\r\n")
        await wait_until(lambda: _metric(session, metrics_url, "torpor_held_requests", "slow",
                                         1.0), 10, "the request held")
        raw.close()
        await wait_until(lambda: _metric(session, metrics_url, "torpor_held_abandoned_total",
                                         "slow", 1.0), 10, "the hang-up counted")
        await wait_until(lambda: _metric(session, metrics_url, "torpor_held_requests", "slow",
                                         0.0), 10, "the hung-up request left the queue")

        held = [asyncio.create_task(send(session, config, "slow.localhost", f"/predict?n={i}"))
                for i in range(3)]
        await wait_until(lambda: _metric(session, metrics_url, "torpor_held_requests", "slow",
                                         3.0), 10, "three requests held")
        code, body, headers = await send(session, config, "slow.localhost", "/predict?n=late")
        assert code == 503 and headers.get("Retry-After") == "1", (code, body)
        assert b"queue_full" in body
        results = await asyncio.gather(*held)
        assert [r[0] for r in results] == [200, 200, 200]

    served = "".join(p.read_text() for p in config.log_dir().glob("slow-*.log"))
    assert "request GET /predict?n=0" in served
    assert "hangup-marker" not in served
    assert "n=late" not in served


async def _metric(session: aiohttp.ClientSession, url: str, name: str, service: str,
                  value: float) -> bool:
    async with session.get(url) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'service="{service}"' in line:
            if float(line.rsplit(" ", 1)[1]) == value:
                return True
    return False


GRPC_ECHO = Path(__file__).resolve().parents[1] / "support" / "grpc_echo.py"


async def test_grpc_service_is_held_woken_and_replayed_by_envoy(start_up: Any) -> None:
    service = f"""  - name: grpcsvc
    host: grpcsvc.localhost
    replicas: 1
    protocol: http2
    local:
      command: [{sys.executable}, {GRPC_ECHO}, --port, "{{port}}", --name, g,
                --load-seconds, "1"]
      ready_probe: tcp
      stop_grace: 5s
"""
    _, config = await start_up(service)
    target = str(config.gateway.listen)
    options = [("grpc.default_authority", "grpcsvc.localhost")]

    async def call(payload: bytes) -> bytes:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            say = channel.unary_unary("/torpor.test.Echo/Say")
            return bytes(await say(payload, timeout=30))

    assert await call(b"warm") == b"g:warm"
    await asyncio.to_thread(admin_client.hibernate, admin_target(config),
                            "grpcsvc")
    await wait_state(config, "grpcsvc", "HIBERNATED", 10)
    await wait_until(lambda: not replica_processes("g"), 10, "no gRPC replica")

    # Held by the activator's h2 holder, woken, then replayed by Envoy to the new replica.
    answers = await asyncio.gather(*(call(f"cold-{i}".encode()) for i in range(10)))
    assert answers == [f"g:cold-{i}".encode() for i in range(10)]
    awake = await wait_state(config, "grpcsvc", "ACTIVE", 10)
    assert [h["to"] for h in awake["history"]][-3:] == ["HIBERNATED", "WAKING", "ACTIVE"]
