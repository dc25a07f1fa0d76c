"""Versions and traffic splits through `torpor up` and a real Envoy, under continuous load:
90/10 → 50/50 → promote v2 → rollback, with no failed request and each measured split
within ±5 points of its weights over 2,000 requests; a rollback is one push. A shift to a
hibernated version holds its requests and answers them once it wakes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns, status_json
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

PER_STEP = 2000
WORKERS = 16


def versioned(load_seconds: float = 0.0) -> str:
    def version(name: str, weight: int) -> str:
        return f"""      - name: {name}
        weight: {weight}
        local:
          command: [python, -m, torpor.examples.model_server, --port, "{{port}}",
                    --name, {name}, --load-seconds, "{load_seconds}"]
          ready_path: /healthz
"""
    return ("  - name: model\n    host: model.localhost\n    policy: {idle_after: 1h}\n"
            "    versions:\n" + version("v1", 90) + version("v2", 10))


class Load:
    """WORKERS clients sending GETs back to back; each answer is kept with the time its
    request was sent, so that a step counts only requests sent after its push applied."""

    def __init__(self, gateway: str) -> None:
        self.url = f"http://{gateway}/predict?text=fine"
        self.answers: list[tuple[float, int, str]] = []  # (sent at, status, version)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._worker(session) for _ in range(WORKERS)))

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                async with session.get(self.url, headers={"Host": "model.localhost"}) as r:
                    await r.read()
                    version = r.headers.get("x-served-by", "?").split(":")[0]
                    self.answers.append((sent, r.status, version))
            except aiohttp.ClientError as exc:
                self.answers.append((sent, 0, repr(exc)))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def split_after(self, since: float) -> collections.Counter[str]:
        """The versions that answered the next PER_STEP requests sent after `since`."""
        deadline = time.monotonic() + 120
        while True:
            after = [a for a in self.answers if a[0] > since]
            if len(after) >= PER_STEP:
                break
            assert time.monotonic() < deadline, f"only {len(after)} answers in 120 s"
            await asyncio.sleep(0.1)
        failed = [a for a in after if a[1] != 200]
        assert not failed, failed[:5]
        return collections.Counter(a[2] for a in after[:PER_STEP])


def share(counts: collections.Counter[str], version: str) -> float:
    return 100.0 * counts[version] / sum(counts.values())


@contextlib.asynccontextmanager
async def model_up(tmp_path: Path, load_seconds: float = 0.0
                   ) -> AsyncIterator[tuple[Path, admin_client.Target, Load]]:
    """`torpor up` with the versioned service, and a load (started by `load.start()`);
    both stopped on the way out, whatever happened."""
    path = write_config(tmp_path, versioned(load_seconds))
    config = load_config(path)
    runs = UpRuns()
    load = Load(str(config.gateway.listen))
    try:
        await runs.start(path)
        yield path, admin_target(config), load
    finally:
        await load.close()
        await runs.stop_all()


async def test_a_split_changes_under_load_with_no_failed_request(tmp_path: Path) -> None:
    async with model_up(tmp_path) as (path, target, load):
        load.start()
        steps: list[tuple[str, dict[str, int]]] = [("start", {"v1": 90, "v2": 10})]
        counts = await load.split_after(time.monotonic())
        measured = [(steps[0][0], counts)]
        for step, change in (
                ("50/50", lambda: admin_client.set_traffic(target, "model", {"v1": 50,
                                                                             "v2": 50})),
                ("promote v2", lambda: admin_client.promote(target, "model", "v2")),
                ("rollback", lambda: admin_client.rollback(target, "model"))):
            result = await asyncio.to_thread(change)
            applied = time.monotonic()
            assert result["applied"], result
            steps.append((step, result["weights"]))
            if step == "rollback":
                print(f"\nrollback: one push, applied by every Envoy in "
                      f"{result['push_seconds'] * 1000:.1f} ms "
                      f"({result['previous']} -> {result['weights']})")
                assert result["weights"] == {"v1": 50, "v2": 50}
            measured.append((step, await load.split_after(applied)))
        for (step, weights), (_, counts) in zip(steps, measured, strict=True):
            total = sum(weights.values())
            for version, weight in weights.items():
                got = share(counts, version)
                print(f"{step}: {version} {got:.1f}% (weight {100 * weight / total:.0f}%)")
                assert abs(got - 100 * weight / total) <= 5, (step, version, counts)
        (model,) = [s for s in status_json(path) if s["name"] == "model"]
        assert [(v["name"], v["weight"]) for v in model["versions"]] == [("v1", 50),
                                                                          ("v2", 50)]
        assert [h["reason"] for h in model["history"]][-3:] == [
            "traffic v1=50 v2=50", "promote v2", "rollback to v1=50 v2=50"]


async def test_a_shift_to_a_sleeping_version_holds_its_requests_until_it_wakes(
        tmp_path: Path) -> None:
    async with model_up(tmp_path, load_seconds=1.5) as (path, target, load):
        await asyncio.to_thread(admin_client.hibernate, target, "model--v2")
        load.start()
        await asyncio.to_thread(admin_client.promote, target, "model", "v2")
        counts = await load.split_after(time.monotonic())  # asserts that none failed
        assert counts["v2"] == sum(counts.values()), counts
        states = {s["name"]: s["state"] for s in status_json(path)}
        assert states["model--v2"] == "ACTIVE"


async def test_asynchronous_calls_follow_the_split_and_are_fetched_under_the_host(
        tmp_path: Path) -> None:
    """`Prefer: respond-async` goes to the activator through the same split as the other
    routes: each call runs on the version Envoy picked (named in the 202), and its result
    is fetched under the service's host whichever version ran it."""
    calls = 40
    async with model_up(tmp_path) as (_path, target, load):
        result = await asyncio.to_thread(admin_client.set_traffic, target, "model",
                                         {"v1": 50, "v2": 50})
        assert result["applied"], result
        url = load.url.removesuffix("/predict?text=fine")
        host = {"Host": "model.localhost"}
        bodies = [f"call {i}".encode() for i in range(calls)]
        async with aiohttp.ClientSession() as session:
            accepted = []
            for body in bodies:
                async with session.post(f"{url}/echo", data=body,
                                        headers={**host, "Prefer": "respond-async"}) as r:
                    assert r.status == 202, await r.text()
                    accepted.append((r.headers["Location"], (await r.json())["service"]))
            ran_on = collections.Counter(service for _, service in accepted)
            print(f"\n{calls} asynchronous calls at 50/50 ran on {dict(ran_on)}")
            assert set(ran_on) == {"model--v1", "model--v2"}, ran_on

            results: dict[str, tuple[int, bytes]] = {}

            async def all_done() -> bool:
                for location, _ in accepted:
                    if location not in results:
                        async with session.get(f"{url}{location}", headers=host) as r:
                            if r.status != 202:
                                results[location] = (r.status, await r.read())
                return len(results) == calls

            await wait_until(all_done, 60, "every call done", interval=0.2)
            assert [results[location] for location, _ in accepted] == [
                (200, body) for body in bodies]
