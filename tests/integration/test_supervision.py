"""Supervision by `torpor up` (a real Envoy, local model servers): an Envoy killed with
SIGKILL is restarted and traffic comes back (the figure is printed, the assertion only
has a generous deadline); requests held for a waking service when Envoy dies leave the
activator (held count back to 0), the wake completes and clients that retry are answered;
a restarted Envoy's dead ADS stream no longer counts (a hibernation, which waits for every
connected Envoy's ACK, still succeeds); a SIGSTOPped replica fails its liveness probe, is
killed and replaced on a new port, and requests through Envoy succeed again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from assembly.envoy_process import SupervisedEnvoy
from tests.integration.test_drain import grpc_service
from tests.support.configs import model_service, write_config
from tests.support.net import free_port, wait_until
from tests.support.up import Up, UpRuns, processes_mentioning, status_json
from torpor import admin_client
from torpor.config import Address, Config, load_config
from torpor.credentials import admin_target
from torpor.supervision import PIDS_NAME, RestartPolicy, start_time

pytestmark = [pytest.mark.envoy,
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="/proc and SIGSTOP semantics are Linux-only here")]

#: Generous: a loaded 2-core CI machine; the measured figure is printed.
BACK_WITHIN = 30.0


@pytest.fixture
async def runs() -> AsyncIterator[UpRuns]:
    started = UpRuns()
    yield started
    await started.stop_all()


def children(config: Config, kind: str, name: str | None = None) -> list[int]:
    """Pids `torpor up` lists in its pidfile for `kind` (and service `name`)."""
    try:
        data = json.loads((config.log_dir() / PIDS_NAME).read_text())
    except (OSError, ValueError):
        return []
    return [c["pid"] for c in data.get("children", [])
            if c["kind"] == kind and (name is None or c["name"] == name)]


def metric(config: Config, name: str, **labels: str) -> float:
    """The value of metric `name` with exactly `labels` on `up`'s endpoint (0 when it has
    no such sample)."""
    with urllib.request.urlopen(f"http://{config.control_plane.metrics}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        found, _, rest = sample.partition("{")
        if found == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return 0.0


async def ask(config: Config, host: str, timeout: float = 5.0) -> int | None:
    """One request through the gateway: its status, None when the connection failed."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.post(f"http://{config.gateway.listen}/predict", data=b"what a great day",
                       headers={"Host": host}) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def kill_envoy(config: Config) -> tuple[int, float]:
    """SIGKILL `up`'s Envoy by pid; returns the pid and when (monotonic)."""
    pids = children(config, "envoy")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    return pids[0], time.monotonic()


async def envoy_restarted(config: Config, old: int) -> int:
    """The new Envoy's pid once the pidfile lists one other than `old`."""
    await wait_until(lambda: children(config, "envoy") not in ([], [old]), BACK_WITHIN,
                     "a new envoy in the pidfile")
    return children(config, "envoy")[0]


async def test_killed_envoy_is_restarted_and_traffic_comes_back(
        tmp_path: Path, runs: UpRuns) -> None:
    path = write_config(tmp_path, model_service("echo", 1))
    config = load_config(path)
    up = await runs.start(path)
    assert await ask(config, "echo.localhost") == 200

    old, killed_at = await kill_envoy(config)
    while await ask(config, "echo.localhost", timeout=2) != 200:
        assert time.monotonic() - killed_at < BACK_WITHIN, up.text()[-3000:]
        await asyncio.sleep(0.05)
    back_after = time.monotonic() - killed_at
    print(f"\ntraffic back {back_after:.2f}s after SIGKILL of envoy (pid {old})")

    new = await envoy_restarted(config, old)
    assert new != old and start_time(old) is None
    assert up.proc is not None and up.proc.poll() is None
    # The supervisor prints its line once it sees /ready, maybe after the first answer.
    await wait_until(lambda: f"envoy restarted (pid {new})" in up.text(), 10,
                     "the restart reported")
    text = up.text()
    assert f"envoy (pid {old}) exited unexpectedly (signal SIGKILL)" in text, text[-3000:]
    assert metric(config, "torpor_envoy_restarts_total") == 1
    # The dead Envoy's ADS stream is gone: only the new one counts ...
    await wait_until(lambda: metric(config, "torpor_xds_connected_envoys") == 1, 10,
                     "one connected envoy")
    # ... so a hibernation, which waits until every connected Envoy applied the flip,
    # completes, and the next request wakes the service through the new Envoy.
    await asyncio.to_thread(admin_client.hibernate, admin_target(config), "echo")
    await wait_until(lambda: status_json(path)[0]["state"] == "HIBERNATED", 15, "HIBERNATED")
    assert await ask(config, "echo.localhost", timeout=30) == 200


async def test_torpor_up_stops_with_exit_1_when_envoy_keeps_dying(tmp_path: Path) -> None:
    path = write_config(tmp_path, model_service("echo", 1))
    config = load_config(path)
    up = Up(path)
    up.start()
    try:
        await up.wait_ready()
        killed: list[int] = []
        for _ in range(5):  # the 5th exit within 2 minutes is not restarted
            await wait_until(lambda: children(config, "envoy") not in ([], *([k] for k in killed)),
                             BACK_WITHIN, "a running envoy")
            [pid] = children(config, "envoy")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        assert up.proc is not None
        code = await asyncio.to_thread(up.proc.wait, 60)
    finally:
        up.kill()
    text = up.text()
    assert code == 1, text[-3000:]
    assert "envoy died 5 times within 120s (last: signal SIGKILL); not restarting it again" \
        in text, text[-3000:]
    assert "stopped; no process left running" in text
    assert not processes_mentioning("--name echo ")


async def test_requests_held_when_envoy_dies_leave_and_retries_are_answered(
        tmp_path: Path, runs: UpRuns) -> None:
    held = 5
    path = write_config(tmp_path, model_service("drowsy", 1, load_seconds=4.0))
    config = load_config(path)
    up = await runs.start(path)
    await asyncio.to_thread(admin_client.hibernate, admin_target(config),
                            "drowsy")
    await wait_until(lambda: not processes_mentioning("--name drowsy "), 15, "no replica")

    def held_now() -> float:
        return metric(config, "torpor_held_requests", service="drowsy")

    requests = [asyncio.create_task(ask(config, "drowsy.localhost", timeout=60))
                for _ in range(held)]
    try:
        await wait_until(lambda: held_now() == held, 15, f"{held} held", interval=0.05)
        old, _ = await kill_envoy(config)
        outcomes = await asyncio.gather(*requests)
    finally:
        for task in requests:
            task.cancel()
    # Their connections went through the dead Envoy: cut, no answer.
    assert outcomes == [None] * held, outcomes

    # The activator let go of them, the wake went on, and the service is ACTIVE.
    await wait_until(lambda: held_now() == 0, 10, "no request held")
    await wait_until(lambda: status_json(path)[0]["state"] == "ACTIVE", 30, "ACTIVE")
    await envoy_restarted(config, old)
    # A client that retries after the restart is answered.
    answers = await asyncio.gather(*(ask(config, "drowsy.localhost", timeout=30)
                                     for _ in range(held)))
    assert answers == [200] * held, (answers, up.text()[-3000:])
    assert metric(config, "torpor_held_abandoned_total", service="drowsy",
                  reason="disconnected") == held


async def test_grpc_calls_held_when_envoy_dies_leave_and_retries_are_answered(
        tmp_path: Path, runs: UpRuns) -> None:
    held = 5
    path = write_config(tmp_path, grpc_service("gdrowsy", 4.0))
    config = load_config(path)
    await runs.start(path)
    await asyncio.to_thread(admin_client.hibernate, admin_target(config),
                            "gdrowsy")
    await wait_until(lambda: not processes_mentioning("--name gdrowsy "), 15, "no replica")

    async def call(payload: bytes) -> bytes | grpc.StatusCode:
        options = [("grpc.default_authority", "gdrowsy.localhost"), ("grpc.enable_retries", 0)]
        async with grpc.aio.insecure_channel(str(config.gateway.listen),
                                             options=options) as channel:
            try:
                return bytes(await channel.unary_unary("/torpor.test.Echo/Say")(
                    payload, timeout=40))
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    def held_now() -> float:
        return metric(config, "torpor_held_requests", service="gdrowsy")

    calls = [asyncio.create_task(call(b"early")) for _ in range(held)]
    try:
        await wait_until(lambda: held_now() == held, 15, f"{held} held", interval=0.05)
        old, _ = await kill_envoy(config)
        outcomes = await asyncio.gather(*calls)
    finally:
        for task in calls:
            task.cancel()
    assert outcomes == [grpc.StatusCode.UNAVAILABLE] * held, outcomes

    await wait_until(lambda: held_now() == 0, 10, "no call held")
    await wait_until(lambda: status_json(path)[0]["state"] == "ACTIVE", 30, "ACTIVE")
    await envoy_restarted(config, old)
    answers = await asyncio.gather(*(call(f"late-{i}".encode()) for i in range(held)))
    assert answers == [f"gdrowsy:late-{i}".encode() for i in range(held)], answers


async def test_a_stopped_replica_is_killed_and_replaced(tmp_path: Path, runs: UpRuns) -> None:
    service = model_service("echo", 1).replace(
        "stop_grace: 5s",
        "stop_grace: 5s\n      liveness: {period: 1s, timeout: 0.5s, failures: 2}")
    path = write_config(tmp_path, service)
    config = load_config(path)
    up = await runs.start(path)
    [old] = children(config, "replica", "echo")
    assert await ask(config, "echo.localhost") == 200

    os.kill(old, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await wait_until(lambda: children(config, "replica", "echo") not in ([], [old]),
                         BACK_WITHIN, "a replacement replica")
        await wait_until(lambda: start_time(old) is None, 10, "the stopped replica gone")
        while await ask(config, "echo.localhost", timeout=2) != 200:
            assert time.monotonic() - stopped_at < BACK_WITHIN, up.text()[-3000:]
            await asyncio.sleep(0.05)
    finally:
        if start_time(old) is not None:
            os.kill(old, signal.SIGCONT)
    print(f"\nreplacement answering {time.monotonic() - stopped_at:.2f}s after SIGSTOP "
          "(liveness: period 1s, 2 failures)")
    [new] = children(config, "replica", "echo")
    assert new != old
    assert metric(config, "torpor_replica_restarts_total", service="echo",
                  reason="liveness") == 1
    assert status_json(path)[0]["replicas"] == 1


async def test_an_envoy_that_keeps_dying_is_given_up(tmp_path: Path) -> None:
    admin = Address("127.0.0.1", free_port())
    boot = tmp_path / "bootstrap.json"
    boot.write_text(json.dumps({"admin": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": admin.port}}}}))
    said: list[str] = []
    policy = RestartPolicy(first_delay=0.1, max_delay=0.2, give_up_after=3, window=60)
    envoy = SupervisedEnvoy(boot, tmp_path / "envoy.log", admin, policy=policy,
                            say=said.append)
    pids = []
    try:
        await envoy.start()
        for restart in (1, 2):
            pid = envoy.pid
            assert pid is not None
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda r=restart: envoy.restarts == r and  # type: ignore[misc]
                             any(s.startswith("envoy restarted") for s in said[-1:]),
                             BACK_WITHIN, f"restart {restart} ready")
        assert envoy.pid is not None
        pids.append(envoy.pid)
        os.kill(envoy.pid, signal.SIGKILL)
        message = await asyncio.wait_for(envoy.wait_failed(), BACK_WITHIN)
    finally:
        await envoy.stop()
    assert message.startswith("envoy died 3 times within 60s (last: signal SIGKILL)"), message
    assert envoy.restarts == 2
    assert [s.split(" exited")[0] for s in said if "exited" in s] == \
        [f"envoy (pid {p})" for p in pids[:2]]
    assert all(start_time(p) is None for p in pids)
