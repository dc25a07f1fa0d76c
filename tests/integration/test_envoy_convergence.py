"""go-control-plane's integration test, for torpor: a real Envoy, five successive snapshots,
and after each, batches of requests converge to exactly what that snapshot says.

Continuous requests run through every push; none may get a 5xx (additions are staged:
clusters and endpoints first, routes once every Envoy ACKed them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.backends import Backend, start_backends
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.xds import XdsHarness, svc
from torpor.config import XDS_PROTOCOLS
from xds_server.resources import RoutedService


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with Envoys speaking delta and state-of-the-world ADS."""
    return str(request.param)


HOSTS = ["a", "b", "c", "d", "e"]


class Traffic:
    """Requests in a loop to every host; records each (host, status, backend)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/predict"
        self.results: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self._stop = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            for host in HOSTS:
                try:
                    async with session.get(self.url, headers={"Host": f"{host}.test"}) as r:
                        await r.read()
                        self.results[(host, r.status)] += 1
                        if r.status >= 500:
                            self.errors.append(f"{host}: {r.status}")
                except aiohttp.ClientError as exc:
                    self.errors.append(f"{host}: {exc!r}")

    def stop(self) -> None:
        self._stop.set()


async def answers(session: aiohttp.ClientSession, port: int, host: str, n: int) -> Counter[str]:
    """Who answered n requests for host (backend name, or 'status:NNN')."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        async with session.get(f"http://127.0.0.1:{port}/", headers={"Host": f"{host}.test"}) as r:
            body = await r.text()
            seen[body if r.status == 200 else f"status:{r.status}"] += 1
    return seen


async def converged(session: aiohttp.ClientSession, port: int,
                    table: list[RoutedService], names: dict[int, str]) -> bool:
    """Every host is answered only by what the table says, every endpoint in turn."""
    for host in HOSTS:
        service = next((s for s in table if s.name == host), None)
        expected = {names[e.port] for e in service.endpoints} if service else {"activator"}
        seen = await answers(session, port, host, 4 * len(expected))
        if set(seen) != expected:
            return False
    return True


async def test_five_snapshots_converge_without_5xx(
    harness: XdsHarness, envoys: Callable[[int, str], Envoy], activator_backend: Backend
) -> None:
    backends = {b.name: b for b in await start_backends("a1", "a2", "b1", "c1", "c2", "d1", "e1")}
    names = {b.port: b.name for b in backends.values()}
    ep = {name: b.endpoint for name, b in backends.items()}
    snapshots = [
        [svc("a", ep["a1"]), svc("b", ep["b1"])],  # initial
        [svc("a", ep["a1"]), svc("b", ep["b1"]), svc("c", ep["c1"]), svc("d", ep["d1"])],  # add
        [svc("a", ep["a2"]), svc("b", ep["b1"]), svc("c", ep["c1"], ep["c2"]),
         svc("d", ep["d1"])],  # endpoints change
        [svc("a", ep["a2"]), svc("c", ep["c1"], ep["c2"])],  # remove
        [svc("a", ep["a1"]), svc("e", ep["e1"])],  # add and remove at once
    ]
    await harness.start(snapshots[0])
    # Two Envoys (two node ids) share the listener port (SO_REUSEPORT): a push counts as
    # applied only when both applied it, so whichever answers must already be converged.
    fleet = [envoys(harness.xds_port, "convergence-1"), envoys(harness.xds_port, "convergence-2")]
    traffic = Traffic(harness.listen_port)
    try:
        for envoy in fleet:
            await envoy.wait_ready()
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: converged(session, harness.listen_port, snapshots[0], names),
                             10, "initial snapshot served")
            loops = [asyncio.create_task(traffic.run(session)) for _ in range(2)]
            for number, table in enumerate(snapshots[1:], start=2):
                total = sum(traffic.results.values())
                await wait_until(lambda t=total: sum(traffic.results.values()) > t + 100,
                                 10, "traffic flowing before the push")
                assert await harness.publish(table), f"snapshot {number} not ACKed"
                # Staged push returned: every Envoy applied it, so it holds at once.
                assert await converged(session, harness.listen_port, table, names), (
                    f"snapshot {number} not served right after its push was ACKed"
                )
            traffic.stop()
            await asyncio.gather(*loops)
    finally:
        traffic.stop()
        for b in backends.values():
            await b.stop()
    assert not traffic.errors, traffic.errors[:20]
    assert sum(traffic.results.values()) > 400, traffic.results
    assert sorted(s.node_id for s in harness.ads.streams()) == ["convergence-1", "convergence-2"]
    with contextlib.suppress(Exception):
        print("requests during pushes:", dict(traffic.results))
