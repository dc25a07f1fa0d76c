"""Per-service isolation with a real Envoy and an in-process control plane.

A service whose resources Envoy refuses (NACK) is quarantined: the config is pushed again
without its bad part, every other service keeps serving, `status` (through the admin API)
and `/ready` show the problem, and a fix releases it. A rejection no service can be blamed
for (the listener's) makes the control plane not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import start_backends
from tests.support.configs import model_service, write_config
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.up import UpRuns
from tests.support.workloads import FixedWorkloads
from tests.support.xds import XdsHarness, with_xds_protocol
from torpor import admin_client, metrics
from torpor.config import XDS_PROTOCOLS, Config, load_config
from torpor.credentials import admin_target
from torpor.model import Endpoint
from torpor.store.sqlite import SqliteStore
from xds_server import validation
from xds_server.bootstrap import API_TYPES
from xds_server.control_plane import ControlPlane
from xds_server.quarantine import Problem, QuarantineBuilder
from xds_server.resources import RoutedService


@pytest.fixture(params=XDS_PROTOCOLS)
def xds_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with Envoys speaking delta and state-of-the-world ADS."""
    return str(request.param)


pytestmark = pytest.mark.envoy


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """stack(config, workloads) starts a control plane (metrics and /ready served);
    every one started is stopped, with its store, at teardown."""
    started: list[tuple[ControlPlane, SqliteStore]] = []

    async def start(config: Config, workloads: FixedWorkloads) -> ControlPlane:
        store = SqliteStore(config.store.path or tmp_path / "state.db")
        await store.open()
        cp = ControlPlane(config, store, workloads, run_policy=False)
        started.append((cp, store))
        await cp.start()
        return cp

    yield start
    for cp, store in started:
        await cp.stop()
        await store.close()


async def ready_page(config: Config) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{config.control_plane.metrics}/ready") as r:
        return r.status, await r.text()


async def statuses(config: Config) -> dict[str, dict[str, object]]:
    """Through the admin API (in a thread: the control plane runs on this loop)."""
    found = await asyncio.to_thread(admin_client.list_statuses, admin_target(config))
    return {s["name"]: s for s in found}


async def problem_of(config: Config, name: str) -> object:
    return (await statuses(config))[name]["problem"]


def quarantined_gauge(name: str) -> float:
    return metrics.SERVICE_QUARANTINED.labels(service=name)._value.get()  # type: ignore[no-any-return]


async def test_a_nacked_service_is_quarantined_and_the_others_keep_serving(
    tmp_path: Path, envoys: Callable[[int, str], Envoy], stack: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The validator knows EDS endpoints must be IP addresses; switched off here so that
    # only Envoy refuses them (a rule the validator would not know).
    monkeypatch.setattr(validation, "check_endpoint_addresses", lambda message, name: [])
    config = load_config(write_config(tmp_path, model_service("alpha", 1) +
                                      model_service("beta", 1), sockets=False))
    alpha, beta = await start_backends("alpha", "beta")
    workloads = FixedWorkloads({"alpha": (alpha.endpoint,), "beta": (beta.endpoint,)})
    try:
        cp = await stack(config, workloads)  # type: ignore[misc]
        assert isinstance(cp, ControlPlane)
        envoy = envoys(config.control_plane.xds.port, "quarantine")
        await envoy.wait_ready()
        url = f"http://{config.gateway.listen}/"
        async with aiohttp.ClientSession() as session:

            async def answer(host: str) -> str:
                async with session.get(url, headers={"Host": host}) as r:
                    return f"{r.status} {await r.text()}"

            async def both_serve() -> bool:
                return (await answer("alpha.localhost") == "200 alpha"
                        and await answer("beta.localhost") == "200 beta")

            await wait_until(both_serve, 15, "both services served")
            assert await problem_of(config, "beta") is None
            assert (await ready_page(config))[0] == 200

            # beta's endpoints turn into a name: Envoy refuses the EDS update.
            workloads.set_endpoints("beta", (Endpoint("beta.invalid", beta.endpoint.port),))
            async def beta_quarantined() -> bool:
                return await problem_of(config, "beta") is not None

            await wait_until(beta_quarantined, 15, "beta quarantined")
            problem = str(await problem_of(config, "beta"))
            assert "Envoy rejected its endpoints" in problem, problem
            assert "beta.invalid" in problem, problem  # Envoy's own words
            assert await problem_of(config, "alpha") is None
            assert quarantined_gauge("beta") == 1

            # Pushed again without the refused part: Envoy applied it, nothing rejected.
            async def settled() -> bool:
                return (await ready_page(config))[0] == 200 and not cp.ads.rejections()

            await wait_until(settled, 15, "the config without beta's bad endpoints applied")
            _, page = await ready_page(config)
            assert "quarantined: beta: Envoy rejected its endpoints" in page, page
            (family,) = metrics.XDS_CONFIG_REJECTED.collect()
            assert family.samples[0].value == 0  # the quarantine resolved the rejection
            # alpha is untouched; beta keeps its last good endpoints (the ones before).
            for _ in range(10):
                assert await answer("alpha.localhost") == "200 alpha"
                assert await answer("beta.localhost") == "200 beta"
            table = admin_client.format_status_table(list((await statuses(config)).values()))
            assert "PROBLEM (quarantined): Envoy rejected its endpoints" in table, table

            # New good endpoints: the rejected part changed, beta leaves quarantine.
            (beta2,) = await start_backends("beta2")
            try:
                workloads.set_endpoints("beta", (beta2.endpoint,))
                async def released() -> bool:
                    return await problem_of(config, "beta") is None

                await wait_until(released, 15,
                                 "beta released")

                async def beta2_serves() -> bool:
                    return await answer("beta.localhost") == "200 beta2"

                await wait_until(beta2_serves, 15, "beta on its new endpoints")
                assert quarantined_gauge("beta") == 0
            finally:
                await beta2.stop()
    finally:
        await alpha.stop()
        await beta.stop()


async def test_a_rejection_nobody_can_be_blamed_for_makes_it_not_ready(
    tmp_path: Path, envoys: Callable[[int, str], Envoy], stack: Callable[..., object],
) -> None:
    """Envoy cannot bind the gateway's listener (the port is taken): it refuses the
    listener, which is every service's; the control plane says not ready, and why."""
    config = load_config(write_config(tmp_path, model_service("alpha", 1), sockets=False))
    (alpha,) = await start_backends("alpha")
    workloads = FixedWorkloads({"alpha": (alpha.endpoint,)})
    taken = socket.socket()
    try:
        taken.bind((config.gateway.listen.host, config.gateway.listen.port))
        taken.listen()
        cp = await stack(config, workloads)  # type: ignore[misc]
        assert isinstance(cp, ControlPlane)
        envoys(config.control_plane.xds.port, "unbindable")

        async def refused() -> bool:
            return (await ready_page(config))[0] == 503

        await wait_until(refused, 20, "/ready answers 503")
        _, page = await ready_page(config)
        assert "not ready: Envoy unbindable rejected lds" in page, page
        _, problems = await asyncio.to_thread(admin_client.list_services,
                                              admin_target(config))
        assert any("rejected lds" in p for p in problems), problems
        assert await problem_of(config, "alpha") is None  # not pinned on a service
        (family,) = metrics.XDS_CONFIG_REJECTED.collect()
        assert family.samples[0].value == 1  # read at the scrape
    finally:
        taken.close()
        await alpha.stop()


async def test_up_names_a_quarantined_service_and_serves_the_others(tmp_path: Path,
                                                                   xds_protocol: str) -> None:
    """Two configured hosts that differ only by a trailing dot: the loader takes both, the
    validator quarantines the second (Envoy would route the two apart, the activator would
    wake the first for both); `torpor up` says so before "ready." and serves the first."""
    second = model_service("second", 1).replace("host: second.localhost",
                                                "host: first.localhost.")
    path = with_xds_protocol(write_config(tmp_path, model_service("first", 1) + second),
                             xds_protocol)
    config = load_config(path)
    assert config.control_plane.xds_protocol == xds_protocol
    runs = UpRuns()
    try:
        up = await runs.start(path)
        text = up.text()
        line = next((t for t in text.splitlines() if "quarantined: second:" in t), None)
        assert line is not None, text
        assert "'first.localhost' is already served by 'first'" in line, line
        assert text.index("quarantined: second:") < text.index("torpor: ready.")
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{config.gateway.listen}/predict",
                headers={"Host": "first.localhost"}) as r:
            assert r.status == 200
        assert (await ready_page(config))[0] == 200
        boot = json.loads((config.log_dir() / "envoy-bootstrap.json").read_text())
        assert boot["dynamic_resources"]["ads_config"]["api_type"] == API_TYPES[xds_protocol]
    finally:
        await runs.stop_all()


async def test_an_unnamed_rejection_is_narrowed_down_with_a_real_envoy(
    envoys: Callable[[int, str], Envoy], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six new services at once, one with a domain Envoy refuses (a line feed;
    the validator is switched off for it): Envoy's error names no service, so all six are
    suspects; halves are let back in on Envoy's verdicts until only the bad one is left
    out, and the five others serve."""
    real = QuarantineBuilder._validate

    def lenient(self: QuarantineBuilder, svc: RoutedService) -> Problem | None:
        return None if "\n" in svc.host else real(self, svc)

    monkeypatch.setattr(QuarantineBuilder, "_validate", lenient)
    (backend,) = await start_backends("ok")
    harness = XdsHarness(Endpoint("127.0.0.1", 9))
    harness.builder = QuarantineBuilder(harness.settings)
    builder = harness.builder
    names = [f"svc{i}" for i in range(6)]
    table = [RoutedService(n, f"{n}.test" if n != "svc3" else "svc3.te\nst",
                           (backend.endpoint,)) for n in names]
    dirty = asyncio.Event()
    harness.ads.add_listeners(
        lambda r: dirty.set() if builder.rejected(r, harness.cache.snapshot()) else None,
        lambda s: dirty.set() if builder.applied(s) else None)
    await harness.start(table)
    envoy = envoys(harness.xds_port, "narrowing")
    pushes = 0

    async def driver() -> None:  # what EnvoyRouting.run does: push whenever asked
        nonlocal pushes
        while True:
            await dirty.wait()
            dirty.clear()
            pushes += 1
            await harness.publish(table)

    task = asyncio.create_task(driver())
    try:
        await envoy.wait_ready()

        def narrowed() -> bool:
            problem = builder.problem("svc3") or ""
            return (list(builder.quarantined()) == ["svc3"]
                    and problem.startswith("Envoy rejected its route") and not dirty.is_set()
                    and not harness.ads.rejections())

        await wait_until(narrowed, 30, "only svc3 left out")
        assert "a dump of the rejected resource" in (builder.problem("svc3") or "")
        url = f"http://127.0.0.1:{harness.listen_port}/"
        async with aiohttp.ClientSession() as session:
            async def all_five() -> bool:
                for n in names:
                    if n == "svc3":
                        continue
                    async with session.get(url, headers={"Host": f"{n}.test"}) as r:
                        if r.status != 200:
                            return False
                return True

            await wait_until(all_five, 10, "the five others served")
        print(f"narrowed down in {pushes} pushes")
        assert 1 < pushes <= 12, pushes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await harness.stop()
        await backend.stop()
