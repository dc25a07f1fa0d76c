"""The learning policy end to end, through `torpor up` with a real Envoy and model servers.

Two services are called in bursts every PERIOD seconds, nothing in between. After the first
gap each has learned a keep-alive shorter than the gap: it is hibernated between bursts,
long before the config's `idle_after` (60 s, only the keep-alive while nothing is learned).
`a` goes on being called: once two gaps agree (one odd gap predicts nothing), it is
pre-woken before its next burst, which finds it ACTIVE with a ready replica (no cold
start). `b` stops: it is hibernated seconds after its last call. Then `torpor up`
restarts: the learned keep-alives are shown again before any new call.

Holds for any sensible plan: regular gaps of ~PERIOD give a keep-alive below PERIOD and a
pre-wake window that starts before PERIOD (with cold_start_price 10 s: a cold start is worth
more than the few seconds of loaded-idle time a window before the call costs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import Up, UpRuns
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

#: Seconds between the starts of two bursts.
PERIOD = 20.0
IDLE_AFTER = 60.0
POLICY = (f"policy: {{kind: learned, cold_start_price: 10s, idle_after: {IDLE_AFTER:g}s, "
          "evict_after: 1h, creation_grace: 1s, check_every: 300ms}")


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[tuple[Up, Config]]]]:
    runs = UpRuns()
    path = write_config(tmp_path, model_service("a", 1, load_seconds=0.5) +
                        model_service("b", 1, load_seconds=0.5), POLICY)

    async def start() -> tuple[Up, Config]:
        return await runs.start(path), load_config(path)

    yield start
    await runs.stop_all()


def status(config: Config, name: str) -> dict[str, Any]:
    return admin_client.get_status(admin_target(config), name)


async def wait_status(config: Config, name: str, what: str,
                      check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.clear()
        seen.update(await asyncio.to_thread(status, config, name))
        return check(seen)

    try:
        await wait_until(reached, timeout, f"{name}: {what}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen}") from None
    return dict(seen)


async def burst(session: aiohttp.ClientSession, config: Config, name: str) -> list[bool]:
    """Three calls in a row; for each, whether it went through a wake (cold start)."""
    cold = []
    for n in range(3):
        async with session.post(f"http://{config.gateway.listen}/predict", data=f"call {n}",
                                headers={"Host": f"{name}.localhost"}) as response:
            assert response.status == 200, await response.text()
            cold.append("x-torpor-cold-start-ms" in response.headers)
    return cold


async def at(moment: float) -> None:
    """The calling schedule: wait until the monotonic time `moment`."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def reasons(status_: dict[str, Any]) -> list[str]:
    return [str(t.get("reason") or "") for t in status_["history"]]


async def test_learned_keep_alive_prewake_and_restart(up: Any) -> None:
    runner, config = await up()
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        for name in ("a", "b"):
            assert await burst(session, config, name) == [False] * 3
        # Nothing learned yet: the keep-alive is idle_after, both stay loaded.
        first = await wait_status(config, "a", "a keep-alive", lambda s: s["keep_alive"]
                                  is not None, timeout=5)
        assert first["keep_alive"] == IDLE_AFTER and first["next_call"] is None

        await at(t0 + PERIOD)
        for name in ("a", "b"):
            assert await burst(session, config, name) == [False] * 3, f"{name} was asleep"
        last_b = time.monotonic()

        # (b) One regular gap learned: hibernated within seconds, not after idle_after.
        b = await wait_status(config, "b", "HIBERNATED", lambda s: s["state"] == "HIBERNATED",
                              timeout=PERIOD)
        assert time.monotonic() - last_b < IDLE_AFTER / 2
        assert b["keep_alive"] is not None and b["keep_alive"] < PERIOD

        # (a) Hibernated between bursts too; its third burst wakes it (one gap is no pattern).
        await wait_status(config, "a", "HIBERNATED", lambda s: s["state"] == "HIBERNATED",
                          timeout=PERIOD / 2)
        await at(t0 + 2 * PERIOD)
        woken_by_calls = len((await asyncio.to_thread(status, config, "a"))["history"])
        await burst(session, config, "a")
        await wait_status(config, "a", "HIBERNATED after its third burst",
                          lambda s: s["state"] == "HIBERNATED"
                          and len(s["history"]) >= woken_by_calls + 4, timeout=PERIOD / 2)
        # Two agreeing gaps: pre-woken before the next burst, ACTIVE with a ready replica.
        deadline = t0 + 3 * PERIOD - time.monotonic() - 0.2
        a = await wait_status(
            config, "a", "pre-woken, ACTIVE with a ready replica",
            lambda s: (s["state"] == "ACTIVE" and len(s["ready_endpoints"]) >= 1
                       and any(r.startswith("pre-wake") for r in reasons(s))),
            timeout=max(deadline, 0.1))
        assert a["next_call"] is not None and a["next_call"] <= time.time() + PERIOD
        assert a["keep_alive"] is not None and a["keep_alive"] < PERIOD
        woke = next(t for t in a["history"] if str(t["reason"]).startswith("pre-wake"))
        assert woke["from"] == "HIBERNATED" and woke["to"] == "WAKING"

        await at(t0 + 3 * PERIOD)
        assert await burst(session, config, "a") == [False] * 3, "the call went through a wake"
        after = await asyncio.to_thread(status, config, "a")
        assert after["history"][-1]["to"] == "ACTIVE"  # no wake since the pre-wake

    # (c) The learned state survives a restart: the same keep-alives before any new call.
    await wait_status(config, "a", "HIBERNATED again", lambda s: s["state"] == "HIBERNATED",
                      timeout=PERIOD / 2)
    before = {n: (await asyncio.to_thread(status, config, n))["keep_alive"] for n in "ab"}
    assert await runner.stop() == 0, runner.text()[-3000:]
    runner.start()
    await runner.wait_ready()
    for name in "ab":
        again = await wait_status(config, name, "a keep-alive after the restart",
                                  lambda s: s["keep_alive"] is not None, timeout=10)
        assert again["keep_alive"] == before[name], (name, before, again)
        assert again["keep_alive"] < PERIOD
