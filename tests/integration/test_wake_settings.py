"""Per-service wake settings and groups end to end, through `torpor up` with a real Envoy
and model servers that take seconds to load.

- A service's own `wake_timeout` outlasts the gateway's: its slow wake answers 200 where a
  service on the gateway's setting gets 504; its own small `max_held` answers 503 earlier.
- `activation_replicas: 1`: the first request is answered after one replica, the rest
  follow to the recorded count; `min_awake` keeps it awake after the wake.
- A group of three: idle → all three hibernate in one pass (not one by one, though their
  own idle_after differ); one request to one of them wakes all three.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns, status, status_json, wait_state
from torpor import admin_client
from torpor.config import Config, load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Config]]]:
    """start_up(services_yaml, extra=..., activator=...) runs `torpor up`; always stopped."""
    runs = UpRuns()

    async def start(services: str, extra: str = "", activator: str = "wake_timeout: 30s"
                    ) -> Config:
        path = write_config(tmp_path, services, extra, activator)
        await runs.start(path)
        return load_config(path)

    yield start
    await runs.stop_all()


def with_keys(entry: str, **keys: str) -> str:
    """A model_service entry with more keys of the service."""
    return entry + "".join(f"    {key}: {value}\n" for key, value in keys.items())




async def hibernate(config: Config, *names: str) -> None:
    for name in names:
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), name)
    for name in names:
        await wait_state(config, name, "HIBERNATED", 15)


async def send(session: aiohttp.ClientSession, config: Config, host: str,
               path: str = "/predict?text=good") -> tuple[int, bytes]:
    async with session.get(f"http://{config.gateway.listen}{path}",
                           headers={"Host": host}) as r:
        return r.status, await r.read()


async def held_requests(session: aiohttp.ClientSession, config: Config, name: str) -> float:
    async with session.get(f"http://{config.control_plane.metrics}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("torpor_held_requests{") and f'service="{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def entered(history: list[dict[str, Any]], state: str) -> float:
    """When the service last entered `state`."""
    return float(next(h["at"] for h in reversed(history) if h["to"] == state))


async def test_own_wake_timeout_waits_longer_and_own_small_queue_refuses_earlier(
        start_up: Any) -> None:
    # The gateway gives a wake 2 s and 50 held requests; both services load for 4 s.
    # replicas: 0 → nothing loads at start-up; a wake starts one.
    config = await start_up(
        with_keys(model_service("patient", 0, load_seconds=4.0),
                  wake_timeout="25s", max_held="2")
        + model_service("hasty", 0, load_seconds=4.0),
        activator="wake_timeout: 2s, max_held_per_service: 50")
    await hibernate(config, "patient", "hasty")
    shown = {s["name"]: s for s in status_json(config.path)}
    assert (shown["patient"]["wake_timeout"], shown["patient"]["max_held"]) == (25.0, 2)
    assert (shown["hasty"]["wake_timeout"], shown["hasty"]["max_held"]) == (2.0, 50)

    async with aiohttp.ClientSession() as session:
        # Two held for patient fill its own queue: the third is refused at once.
        held = [asyncio.create_task(send(session, config, "patient.localhost"))
                for _ in range(2)]
        await wait_until(lambda: _equals(held_requests(session, config, "patient"), 2.0), 10,
                         "two requests held for patient")
        code, body = await send(session, config, "patient.localhost")
        assert code == 503 and b"queue_full" in body and b"services[].max_held" in body, body
        # Three for hasty fit in the gateway's queue of 50, and give up after its 2 s.
        hasty = await asyncio.gather(*(send(session, config, "hasty.localhost")
                                       for _ in range(3)))
        for code, body in hasty:
            assert code == 504 and b"did not become ready within 2s" in body, body
        # Patient's wake takes its 4 s load, past the gateway's 2 s: answered.
        for code, body in await asyncio.gather(*held):
            assert code == 200, body
    await wait_state(config, "patient", "ACTIVE", 10)
    assert (await wait_state(config, "hasty", "HIBERNATED", 10))["replicas"] == 0


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_activation_replicas_answer_after_one_then_the_rest_follow(
        start_up: Any) -> None:
    # Idle after 1 s, but min_awake keeps it awake for 10 s after a wake.
    config = await start_up(
        with_keys(model_service("big", 3, load_seconds=3.0),
                  activation_replicas="1", min_awake="10s", policy="{idle_after: 1s}"),
        extra="policy: {kind: fixed, idle_after: 10m, creation_grace: 0s, check_every: 250ms}")
    slept = await wait_state(config, "big", "HIBERNATED", 30)  # the policy: idle after 1 s
    assert slept["recorded_replicas"] == 3 and slept["activation_replicas"] == 1

    async with aiohttp.ClientSession() as session:
        code, body = await send(session, config, "big.localhost")
        assert code == 200, body
    # Answered after the one activation replica; the other two started only then and load
    # for 3 s: they are not ready yet, but running, and counted as wanted.
    now = await asyncio.to_thread(status, config, "big")
    assert now["state"] == "ACTIVE" and len(now["ready_endpoints"]) == 1, now
    assert now["replicas"] == 3 and now["desired_replicas"] == 3, now
    await wait_until(lambda: len(status(config, "big")["ready_endpoints"]) == 3, 15,
                     "the rest ready, to the recorded count")
    woken = entered(now["history"], "ACTIVE")

    # Idle after 1 s by its own policy, yet not hibernated before min_awake (10 s).
    again = await wait_state(config, "big", "HIBERNATED", 30)
    assert entered(again["history"], "HIBERNATING") >= woken + 10.0
    assert again["recorded_replicas"] == 3


GROUP = "pipeline"


def member(name: str, idle_after: str) -> str:
    return with_keys(model_service(name, 1), group=GROUP,
                     policy=f"{{idle_after: {idle_after}}}")


async def test_a_group_of_three_sleeps_together_and_wakes_together(start_up: Any) -> None:
    # Own idle_after 1 s, 1 s and 8 s: grouped, none sleeps before the last is idle.
    config = await start_up(
        member("tokenize", "1s") + member("embed", "1s") + member("rank", "8s")
        + model_service("loner", 1),
        extra="policy: {kind: fixed, idle_after: 1s, evict_after: 1h, creation_grace: 0s, "
              "check_every: 250ms}")
    names = ("tokenize", "embed", "rank")
    shown = {s["name"]: s for s in status_json(config.path)}
    assert {n: shown[n]["group"] for n in (*names, "loner")} == {
        "tokenize": GROUP, "embed": GROUP, "rank": GROUP, "loner": None}

    asleep = {n: await wait_state(config, n, "HIBERNATED", 30) for n in names}
    rank_idle = asleep["rank"]["created_at"] + 8.0
    for name in names:  # all in the pass where rank became idle, none before
        went = entered(asleep[name]["history"], "HIBERNATING")
        assert went >= rank_idle, (name, went, rank_idle)
        assert f"group {GROUP} idle" in asleep[name]["history"][-2]["reason"]
        assert asleep[name]["replicas"] == 0 and asleep[name]["recorded_replicas"] == 1

    async with aiohttp.ClientSession() as session:
        code, body = await send(session, config, "embed.localhost")
        assert code == 200, body
    for name in names:  # one request woke all three
        awake = await wait_state(config, name, "ACTIVE", 15)
        assert awake["replicas"] == 1
        reasons = [h["reason"] for h in awake["history"] if h["to"] == "WAKING"]
        assert reasons[-1] == ("first request" if name == "embed"
                               else f"group {GROUP}: woken with embed"), reasons
