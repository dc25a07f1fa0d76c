"""`torpor up` end to end, as a user runs it: a real Envoy, model servers as local
processes, the sqlite store. Requests are answered through Envoy; SIGTERM leaves no
process behind; a restart keeps the service table, states and histories."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.up import Up, processes_mentioning, status_json
from torpor.config import Config, load_config
from torpor.model import ServiceState
from torpor.store.sqlite import SqliteStore


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    config_path = write_config(tmp_path, model_service("echo", 2, load_seconds=0.3) +
                               model_service("sentiment", 1))
    runner = Up(config_path)
    yield runner
    runner.kill()


async def get(config: Config, host: str, path: str = "/predict",
              body: bytes = b"what a great and wonderful day") -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(
        f"http://{config.gateway.listen}{path}", data=body, headers={"Host": host}
    ) as r:
        return r.status, await r.text()


async def test_up_serves_stops_cleanly_and_keeps_state(up: Up) -> None:
    config = load_config(up.config_path)
    up.start()
    await up.wait_ready()

    status, body = await get(config, "echo.localhost")
    assert status == 200, body
    assert json.loads(body)["model"] == "echo"
    assert json.loads(body)["label"] == "positive"
    status, body = await get(config, "unknown.localhost")
    assert status == 404 and "unknown.localhost" in body

    before = {s["name"]: s for s in await asyncio.to_thread(status_json, up.config_path)}
    assert before["echo"]["state"] == "ACTIVE" and before["echo"]["replicas"] == 2
    assert before["echo"]["recorded_replicas"] == 2
    assert set(before["echo"]) >= {"name", "state", "replicas", "recorded_replicas",
                                   "last_call"}
    ports = [e.split(":")[1] for s in before.values() for e in s["ready_endpoints"]]  # type: ignore[attr-defined]
    assert len(ports) == 3

    async with aiohttp.ClientSession() as session, session.get(
        f"http://{config.control_plane.metrics}/metrics"
    ) as r:
        exported = await r.text()
    assert "torpor_xds_connected_envoys 1.0" in exported
    assert 'torpor_service_state{service="echo",state="ACTIVE"} 1.0' in exported
    assert 'torpor_xds_acks_total{type="cds"}' in exported

    assert await up.stop() == 0
    assert "stopped" in up.text()
    assert not processes_mentioning(str(up.config_path.parent)), "envoy left running"
    leftovers = [p for p in processes_mentioning("torpor.examples.model_server")
                 if any(f"--port {port} " in p for port in ports)]
    assert not leftovers, leftovers

    # Offline, the operator's store says sentiment is asleep (as hibernation will record).
    store = SqliteStore(config.store.path)  # type: ignore[arg-type]
    await store.open()
    record = await store.get("sentiment")
    assert record is not None
    record = record.with_state(ServiceState.HIBERNATING, record.updated_at + 1, "test")
    record = record.with_state(ServiceState.HIBERNATED, record.updated_at + 1, "test")
    await store.put(dataclasses.replace(record, recorded_replicas=1))
    await store.close()

    up.start()
    await up.wait_ready()
    after = {s["name"]: s for s in await asyncio.to_thread(status_json, up.config_path)}
    assert after["echo"]["state"] == "ACTIVE"
    assert after["echo"]["history"] == before["echo"]["history"]
    assert after["echo"]["created_at"] == before["echo"]["created_at"]
    assert after["sentiment"]["state"] == "HIBERNATED"
    assert after["sentiment"]["replicas"] == 0 and after["sentiment"]["recorded_replicas"] == 1
    assert [h["to"] for h in after["sentiment"]["history"]] == [  # type: ignore[union-attr]
        "ACTIVE", "HIBERNATING", "HIBERNATED"]
    status, body = await get(config, "echo.localhost")
    assert status == 200
    status, body = await get(config, "sentiment.localhost")  # held by the activator, woken
    assert status == 200 and json.loads(body)["model"] == "sentiment"
    assert await up.stop() == 0


async def test_bad_config_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: {listen: 127.0.0.1:8080, admin: 127.0.0.1:8080}\nservices: []\n")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "assembly.cli", "up", "--config", str(bad)],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert str(bad) in err and "gateway.admin" in err and "gateway.listen" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not processes_mentioning(str(tmp_path))
