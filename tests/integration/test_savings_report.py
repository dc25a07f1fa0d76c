"""The savings report end to end, through `torpor up` with a real Envoy and model servers:
hibernate a service with 2 replicas, keep it asleep a measured time, wake it with a
request, then `torpor report --json` shows the replica-seconds saved (asleep time x 2)
and one cold start with the wait the client saw; the metrics say the same; after a
restart of `torpor up` the report still holds them, counted once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up, stop_all
from torpor.config import Config, load_config

pytestmark = pytest.mark.envoy

SERVICE = "thrifty"
LOAD_SECONDS = 1.5
ASLEEP_SECONDS = 3.0
CHECK_EVERY = 0.25
#: The policy never hibernates it on its own during the test: only `torpor hibernate` does.
POLICY = (f"policy: {{kind: fixed, idle_after: 1h, evict_after: 24h, creation_grace: 0s, "
          f"check_every: {CHECK_EVERY}s}}")


@pytest.fixture
async def runners() -> AsyncIterator[list[Up]]:
    started: list[Up] = []
    yield started
    await stop_all(started)


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "assembly.cli", *args, "--config",
                             str(config_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def report(config_path: Path) -> dict[str, Any]:
    document = json.loads(cli(config_path, "report", "--json").stdout)
    assert isinstance(document, dict)
    return document


def row(document: dict[str, Any]) -> dict[str, Any]:
    rows = {r["name"]: r for r in document["services"]}
    return dict(rows[SERVICE])


async def start(runners: list[Up], path: Path) -> Up:
    up = Up(path)
    runners.append(up)
    up.start()
    await up.wait_ready()
    return up


async def metrics_text(config: Config) -> str:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{config.control_plane.metrics}/metrics") as r:
        return await r.text()


async def test_report_shows_replica_seconds_saved_and_the_cold_start(
        tmp_path: Path, runners: list[Up]) -> None:
    path = write_config(tmp_path, model_service(SERVICE, 2, load_seconds=LOAD_SECONDS), POLICY)
    config = load_config(path)
    up = await start(runners, path)

    before = time.monotonic()
    asleep = await asyncio.to_thread(cli, path, "hibernate", SERVICE)
    hibernated = time.monotonic()  # HIBERNATED was written between `before` and now
    assert "HIBERNATED" in asleep.stdout
    await asyncio.sleep(ASLEEP_SECONDS)  # the measured sleep itself, not a wait for a state
    async with aiohttp.ClientSession() as session:
        sent = time.monotonic()  # WAKING is written between `sent` and `answered`
        async with session.get(f"http://{config.gateway.listen}/predict?text=good",
                               headers={"Host": f"{SERVICE}.localhost"}) as r:
            assert r.status == 200, await r.text()
            cold_ms = int(r.headers["x-torpor-cold-start-ms"])
        answered = time.monotonic()

    # The cold start counts as soon as ACTIVE is written; the sleep up to WAKING is exact.
    async def counted() -> bool:
        return bool(row(await asyncio.to_thread(report, path))["cold_starts"] == 1)

    await wait_until(counted, 10, "the cold start in the report")
    first = row(await asyncio.to_thread(report, path))
    low, high = (sent - hibernated) * 2, (answered - before) * 2
    print(f"asleep x 2 between {low:.2f} and {high:.2f} replica-seconds; report says "
          f"{first['replica_seconds_saved']:.2f}; cold start {first['cold_start_seconds']:.2f}s"
          f" (client saw {cold_ms} ms, request took {answered - sent:.2f}s)")
    assert low - 2 * CHECK_EVERY <= first["replica_seconds_saved"] <= high + 2 * CHECK_EVERY
    assert first["cold_starts"] == 1
    assert LOAD_SECONDS <= first["cold_start_seconds"] <= answered - sent
    assert abs(first["cold_start_seconds"] - cold_ms / 1000) < 0.5
    assert (first["prewakes"], first["prewakes_wasted"]) == (0, 0)
    # And exactly what the record's history says: HIBERNATED → WAKING, x 2 replicas.
    history = json.loads(cli(path, "status", "--json").stdout)[0]["history"]
    slept = next(h["at"] for h in history if h["to"] == "HIBERNATED")
    woke = next(h["at"] for h in history if h["to"] == "WAKING")
    assert first["replica_seconds_saved"] == pytest.approx((woke - slept) * 2, abs=0.01)

    # Later reports: the saving stays (it is awake), the cold start is not counted again.
    await asyncio.sleep(2 * CHECK_EVERY)
    again = row(await asyncio.to_thread(report, path))
    assert again["replica_seconds_saved"] == pytest.approx(first["replica_seconds_saved"])
    assert again["cold_starts"] == 1
    document = await asyncio.to_thread(report, path)
    assert document["total"]["cold_starts"] >= 1 and document["since"] is None
    table = (await asyncio.to_thread(cli, path, "report")).stdout
    assert table.splitlines()[0].startswith("NAME") and SERVICE in table and "TOTAL" in table
    hour = json.loads((await asyncio.to_thread(cli, path, "report", "--json", "--since",
                                               "1h")).stdout)
    assert row(hour)["cold_starts"] == 1 and hour["since"] == 3600

    text = await metrics_text(config)
    assert f'torpor_cold_starts_total{{service="{SERVICE}"}} 1.0' in text
    assert f'torpor_cold_start_seconds_count{{service="{SERVICE}"}} 1.0' in text
    assert f'torpor_replica_seconds_saved_total{{service="{SERVICE}"}}' in text

    # A restart: the ledger saved at stop is loaded again, nothing is counted twice.
    assert await up.stop() == 0
    await start(runners, path)
    restarted = row(await asyncio.to_thread(report, path))
    assert restarted["cold_starts"] == 1
    assert restarted["replica_seconds_saved"] == pytest.approx(first["replica_seconds_saved"])
    assert restarted["cold_start_seconds"] == pytest.approx(first["cold_start_seconds"])
