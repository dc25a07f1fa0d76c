"""Asynchronous calls through `torpor up` and a real Envoy: `Prefer: respond-async` is
answered 202 with a Location at once, for a sleeping service (the wake and the call go on
without the client) and for an awake one; a GET of the Location answers 202 while the call
runs, then the call's own status and body."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns, status_json
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

LOAD_SECONDS = 3.0
CALLS = 20


async def _submit(session: aiohttp.ClientSession, gateway: str, host: str,
                  body: bytes) -> tuple[int, str, float]:
    started = time.monotonic()
    async with session.post(f"http://{gateway}/echo", data=body,
                            headers={"Host": host, "Prefer": "respond-async"}) as r:
        await r.read()
        return r.status, r.headers.get("Location", ""), time.monotonic() - started


async def _result(session: aiohttp.ClientSession, gateway: str, host: str,
                  location: str) -> tuple[int, bytes]:
    async with session.get(f"http://{gateway}{location}", headers={"Host": host}) as r:
        return r.status, await r.read()


async def test_calls_to_a_sleeping_service_are_accepted_at_once_and_fetched_later(
        tmp_path: Path) -> None:
    path = write_config(tmp_path, model_service("slow", 1, load_seconds=LOAD_SECONDS))
    config = load_config(path)
    gateway, host = str(config.gateway.listen), "slow.localhost"
    runs = UpRuns()
    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "slow")
        bodies = [os.urandom(1000 + i * 97) for i in range(CALLS)]
        async with aiohttp.ClientSession() as session:
            submitted = await asyncio.gather(
                *(_submit(session, gateway, host, body) for body in bodies))
            print(f"\n{CALLS} calls answered in at most "
                  f"{max(took for _, _, took in submitted):.2f}s (load {LOAD_SECONDS:g}s)")
            assert [status for status, _, _ in submitted] == [202] * CALLS
            assert all(took < LOAD_SECONDS for _, _, took in submitted)  # not after the wake
            locations = [location for _, location, _ in submitted]
            assert len(set(locations)) == CALLS
            assert all(loc.startswith("/.torpor/async/") for loc in locations)
            # While the service loads, the status says "still running".
            assert (await _result(session, gateway, host, locations[0]))[0] == 202

            results: dict[str, tuple[int, bytes]] = {}

            async def all_done() -> bool:
                for location in locations:
                    if location not in results:
                        status, body = await _result(session, gateway, host, location)
                        if status != 202:
                            results[location] = (status, body)
                return len(results) == CALLS

            await wait_until(all_done, 60, "every call done", interval=0.2)
            assert [results[loc] for loc in locations] == [(200, body) for body in bodies]
            # Fetched again: the result is kept (bounded by activator.async_result_ttl).
            assert await _result(session, gateway, host, locations[-1]) == (200, bodies[-1])
            # Under another service's host, or made up, a call is not found.
            assert (await _result(session, gateway, host, "/.torpor/async/nope"))[0] == 404
        (slow,) = status_json(path)
        assert slow["state"] == "ACTIVE"
    finally:
        await runs.stop_all()


async def test_a_call_to_an_awake_service_is_run_by_the_activator_too(tmp_path: Path) -> None:
    path = write_config(tmp_path, model_service("quick", 1))
    config = load_config(path)
    gateway, host = str(config.gateway.listen), "quick.localhost"
    runs = UpRuns()
    try:
        await runs.start(path)
        async with aiohttp.ClientSession() as session:
            status, location, _ = await _submit(session, gateway, host, b"hello")
            assert (status, location[:15]) == (202, "/.torpor/async/")
            answers: list[tuple[int, bytes]] = []

            async def done() -> bool:
                answers.append(await _result(session, gateway, host, location))
                return answers[-1][0] != 202

            await wait_until(done, 30, "the call done", interval=0.1)
            assert answers[-1] == (200, b"hello")
            # Without the preference, the same call is answered directly by the replica.
            async with session.post(f"http://{gateway}/echo", data=b"direct",
                                    headers={"Host": host}) as r:
                assert (r.status, await r.read()) == (200, b"direct")
    finally:
        await runs.stop_all()
