"""Restarting the control plane does not disturb traffic.

Envoy keeps serving its last config while the control plane is away, and the new control
plane loads its state before it accepts Envoy's reconnect, so it never pushes an empty
config. Replicas are not the control plane's children here (as in Kubernetes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import start_backends
from tests.support.configs import model_service, write_config
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.workloads import FixedWorkloads
from torpor.config import XDS_PROTOCOLS, load_config
from torpor.store.sqlite import SqliteStore
from xds_server.control_plane import ControlPlane


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with Envoys speaking delta and state-of-the-world ADS."""
    return str(request.param)


async def test_restart_does_not_disturb_traffic(
    tmp_path: Path, envoys: Callable[[int, str], Envoy]
) -> None:
    config = load_config(write_config(tmp_path, model_service("alpha", 1) +
                                      model_service("beta", 1), sockets=False))
    alpha, beta, beta2 = await start_backends("alpha", "beta", "beta2")
    workloads = FixedWorkloads({"alpha": (alpha.endpoint,), "beta": (beta.endpoint,)})

    stores: list[SqliteStore] = []

    async def control_plane() -> ControlPlane:
        """A control plane on its own (opened) store, as its assembly would give it."""
        store = SqliteStore(config.store.path or tmp_path / "state.db")
        await store.open()
        stores.append(store)
        return ControlPlane(config, store, workloads, serve_metrics=False)

    first = await control_plane()
    await first.start()
    envoy = envoys(config.control_plane.xds.port, "restart")
    url = f"http://{config.gateway.listen}/"
    failures: list[str] = []
    answered = 0
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, host: str, expect: set[str]) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                async with session.get(url, headers={"Host": host}) as r:
                    body = await r.text()
                    if r.status != 200 or body not in expect:
                        failures.append(f"{host}: {r.status} {body[:60]}")
                    answered += 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    second: ControlPlane | None = None
    try:
        await envoy.wait_ready()
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(client(session, "alpha.localhost", {"alpha"})),
                     asyncio.create_task(client(session, "beta.localhost", {"beta", "beta2"}))]
            await wait_until(lambda: answered > 50, 10, "traffic before the restart")
            await first.stop()
            during_outage = answered
            await wait_until(lambda: answered > during_outage + 100, 10,
                             "traffic while the control plane is down")
            second = await control_plane()
            await second.start()
            await wait_until(lambda: bool(second and second.ads.streams()), 15,
                             "Envoy reconnected to the new control plane")
            # The new control plane is in charge: an endpoint change reaches Envoy.
            workloads.set_endpoints("beta", (beta2.endpoint,))

            async def beta2_serves() -> bool:
                async with session.get(url, headers={"Host": "beta.localhost"}) as r:
                    return await r.text() == "beta2"

            await wait_until(beta2_serves, 10, "a push from the restarted control plane")
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        if second is not None:
            await second.stop()
        for store in stores:
            await store.close()
        for backend in (alpha, beta, beta2):
            await backend.stop()
    assert not failures, failures[:10]
    print(f"requests answered across the restart: {answered}, failed: {len(failures)}")
