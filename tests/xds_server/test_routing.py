"""EnvoyRouting.wait_routed: what a held HTTP/2 stream waits for before Envoy replays it.
Every stream of a service shares one confirmation (one wait, one push), however many are
held; the confirmation needs the service ACTIVE with a ready replica first."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.support.workloads import FixedWorkloads
from torpor.catalog import ServiceCatalog
from torpor.clock import ManualClock
from torpor.config import LocalServiceConfig, ServiceConfig
from torpor.errors import TorporError, UnknownServiceError
from torpor.model import Endpoint, ServiceRecord, ServiceState
from torpor.service_table import ServiceTable
from xds_server.cache import SnapshotCache
from xds_server.routing import EnvoyRouting
from xds_server.server import AdsServer

REPLICA = Endpoint("127.0.0.1", 9)
ACTIVATOR = (Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2))


class CountingPublisher:
    """Counts pushes; every connected Envoy (none here) applies them."""

    def __init__(self) -> None:
        self.pushes = 0

    async def publish(self, build: object) -> bool:
        self.pushes += 1
        await asyncio.sleep(0.01)  # a push takes a while: callers arriving meanwhile join
        return True


def routing(state: ServiceState, ready: bool) -> tuple[EnvoyRouting, ServiceTable,
                                                         CountingPublisher]:
    service = ServiceConfig(name="svc", host="svc.localhost",
                            local=LocalServiceConfig(command=("x",)))
    workloads = FixedWorkloads({"svc": (REPLICA,) if ready else ()})
    table = ServiceTable(ServiceCatalog([service]), store=None,  # type: ignore[arg-type]
                         workloads=workloads, clock=ManualClock())
    record = ServiceRecord.new("svc", 1, 0.0)
    table.records["svc"] = dataclasses.replace(record, state=state, revision=1)
    cache = SnapshotCache()
    publisher = CountingPublisher()
    envoy = EnvoyRouting(table, workloads, builder=None,  # type: ignore[arg-type]
                         cache=cache, ads=AdsServer(cache),
                         publisher=publisher,  # type: ignore[arg-type]
                         configured_activator=ACTIVATOR, confirm_timeout=2.0)
    return envoy, table, publisher


async def test_many_held_streams_share_one_confirmation() -> None:
    envoy, _, publisher = routing(ServiceState.ACTIVE, ready=True)
    await asyncio.gather(*(envoy.wait_routed("svc") for _ in range(200)))
    assert publisher.pushes == 1


async def test_confirmation_waits_for_the_wake_to_reach_the_table() -> None:
    envoy, table, publisher = routing(ServiceState.WAKING, ready=True)
    waiting = asyncio.create_task(envoy.wait_routed("svc"))
    await asyncio.sleep(0.05)
    assert not waiting.done() and publisher.pushes == 0
    current = table.records["svc"]
    table.apply(dataclasses.replace(current, state=ServiceState.ACTIVE,
                                    revision=current.revision + 1))
    await asyncio.wait_for(waiting, 2)
    assert publisher.pushes == 1


async def test_no_confirmation_for_a_service_that_stays_asleep() -> None:
    envoy, _, publisher = routing(ServiceState.HIBERNATED, ready=False)
    envoy._confirm_timeout = 0.1
    with pytest.raises(TorporError, match=r"is HIBERNATED here after 0\.1s"):
        await envoy.wait_routed("svc")
    assert publisher.pushes == 0
    with pytest.raises(UnknownServiceError):
        await envoy.wait_routed("ghost")


def test_a_wake_longer_than_the_gateways_gets_routes_that_wait_for_it() -> None:
    """A service whose wake_timeout outlasts the gateway's route timeout (e.g. one found
    later with a `torpor.io/wake-timeout` annotation) gets routes that wait that long
    (plus the margin); so does the catch-all, which reaches it once it is evicted. The
    other services keep the gateway's."""
    from xds_server import types
    from xds_server.resources import (
        CATCH_ALL_VHOST,
        ROUTE_CONFIG_NAME,
        GatewaySettings,
        ResourceBuilder,
    )
    from xds_server.routing import ROUTE_TIMEOUT_MARGIN

    def service(name: str, wake_timeout: float | None) -> ServiceConfig:
        return ServiceConfig(name=name, host=f"{name}.localhost", wake_timeout=wake_timeout,
                             local=LocalServiceConfig(command=("x",)))

    services = [service("big", 570.0), service("small", None)]
    workloads = FixedWorkloads({"big": (REPLICA,), "small": (REPLICA,)})
    table = ServiceTable(ServiceCatalog(services), store=None,  # type: ignore[arg-type]
                         workloads=workloads, clock=ManualClock())
    for s in services:
        table.records[s.name] = dataclasses.replace(ServiceRecord.new(s.name, 1, 0.0),
                                                    state=ServiceState.ACTIVE, revision=1)
    cache = SnapshotCache()
    builder = ResourceBuilder(GatewaySettings(listen=Endpoint("127.0.0.1", 8080),
                                              activators=(ACTIVATOR[0],), route_timeout=150.0))
    envoy = EnvoyRouting(table, workloads, builder=builder, cache=cache,
                         ads=AdsServer(cache), publisher=CountingPublisher(),  # type: ignore[arg-type]
                         configured_activator=ACTIVATOR, confirm_timeout=2.0)

    def timeouts() -> dict[str, set[float]]:
        from envoy.config.route.v3 import route_pb2

        config = route_pb2.RouteConfiguration()
        envoy.desired().resources[types.ROUTE][ROUTE_CONFIG_NAME].body.Unpack(config)
        # (The status route of asynchronous calls answers at once: the gateway's timeout.)
        return {v.name: {r.route.timeout.ToTimedelta().total_seconds() for r in v.routes
                         if not r.name.endswith("/async-status")}
                for v in config.virtual_hosts}

    longest = 570.0 + ROUTE_TIMEOUT_MARGIN
    assert timeouts() == {"big": {longest}, "small": {150.0}, CATCH_ALL_VHOST: {longest}}
    table.records["big"] = dataclasses.replace(table.records["big"],
                                               state=ServiceState.EVICTED, revision=2)
    envoy.mark_dirty("big")
    assert timeouts() == {"small": {150.0}, CATCH_ALL_VHOST: {longest}}
