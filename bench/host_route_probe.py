"""Host-keyed routing probe: could one shared route that picks the cluster named by the
request's Host carry 10,000 torpor services, instead of a virtual host per service?

    python bench/host_route_probe.py [--services 10000] [--evicted 100]

An experiment beside the product, like bench/ondemand_probe.py (whose delta-ADS servicer
it reuses). It builds torpor's resources for N services, then rewrites them:
  * each service's cluster and ClusterLoadAssignment are named by its host;
  * the route table is one `*` virtual host: torpor's routes of one service, with every
    route to the service's cluster reading the cluster from `:authority` instead
    (`cluster_header`), and the connection manager strips any port from the Host;
  * `envoy.filters.http.on_demand` with ODCDS over ADS sits before the router, so a host
    whose cluster Envoy does not hold (an evicted service, an unknown host) is asked for.
It prints Envoy's sync time, RSS right after the sync and 3 s later, heap, what a request
by host, with a port or in capitals gets, adding one service (cluster + endpoints), an
endpoint flip, an evicted service's first request (ODCDS round trip) and an unknown host.

Everything listens on 127.0.0.1; every process it starts is stopped in a finally block;
every wait has a deadline. Wall-clock figures move with the machine's load (printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ondemand_probe import Envoy, Plane, get, ms, pct, serve_to_envoy, wait_for
from xds_scale import Backend, free_port, load_average

from torpor.model import Endpoint
from xds_server import types
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService

LOOPBACK = "127.0.0.1"
VARIANTS: set[str] = set()


def packed(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


class HostPlane(Plane):
    """The resources of N services, keyed by host; `evicted` of them only on demand."""

    def __init__(self, table: list[RoutedService], activator: Endpoint, listen: int,
                 evicted: int, lb: str = "") -> None:

        builder = ResourceBuilder(GatewaySettings(listen=Endpoint(LOOPBACK, listen),
                                                  activators=(activator,)))
        built = builder.build(table)
        self.mode = "odcds"
        by_name = {s.name: s.host for s in table}
        self.clusters: dict[str, any_pb2.Any] = {}
        self.clas: dict[str, any_pb2.Any] = {}
        for name, r in built[types.CLUSTER].items():
            cl = cluster_pb2.Cluster()
            r.body.Unpack(cl)
            host = by_name.get(name)
            if host is not None:
                cl.name = host
                cl.alt_stat_name = name  # statistics by the service's name, as torpor does
                if cl.eds_cluster_config.service_name:
                    cl.eds_cluster_config.service_name = host
                if lb:
                    cl.lb_policy = cluster_pb2.Cluster.LbPolicy.Value(lb)
                if "nocb" in VARIANTS:
                    cl.ClearField("circuit_breakers")
                if "static" in VARIANTS:
                    cl.type = cluster_pb2.Cluster.STATIC
                    cl.ClearField("eds_cluster_config")
                    src = endpoint_pb2.ClusterLoadAssignment()
                    built[types.ENDPOINT][name].body.Unpack(src)
                    src.cluster_name = host
                    cl.load_assignment.CopyFrom(src)
            self.clusters[cl.name] = packed(cl)
        for name, r in built[types.ENDPOINT].items():
            cla = endpoint_pb2.ClusterLoadAssignment()
            r.body.Unpack(cla)
            cla.cluster_name = by_name.get(name, name)
            self.clas[cla.cluster_name] = packed(cla)
        route = route_pb2.RouteConfiguration()
        next(iter(built[types.ROUTE].values())).body.Unpack(route)
        first = table[0]
        own = next(vh for vh in route.virtual_hosts if first.host in vh.domains)
        shared = route_components_pb2.VirtualHost()
        shared.CopyFrom(own)
        shared.name = "by_host"
        del shared.domains[:]
        shared.domains.append("*")
        for r in shared.routes:
            if r.route.cluster == first.name:
                r.route.ClearField("cluster")
                r.route.cluster_header = ":authority"
                r.route.cluster_not_found_response_code = (
                    route_components_pb2.RouteAction.NOT_FOUND)
            r.name = r.name.replace(first.name, "by_host")
        base = route_pb2.RouteConfiguration()
        base.CopyFrom(route)
        del base.virtual_hosts[:]
        base.virtual_hosts.append(shared)
        self.route_name = route.name
        self.base_route = base
        self.vhosts = {}
        self.listeners = {}
        for name, r in built[types.LISTENER].items():
            lst = listener_pb2.Listener()
            r.body.Unpack(lst)
            self._add_on_demand(lst)
            self._strip_port(lst)
            self.listeners[name] = lst
        self.evicted = {s.host for s in table[len(table) - evicted:]} if evicted else set()
        self.base_clusters = {n for n in self.clusters if n not in self.evicted}
        self.streams = []
        self.not_found = "removed"
        self.first_requests = {}
        self.vhost_version = {}
        self.requested = {}
        self.service_cluster = {s.host: s.host for s in table}
        self.admin_port = 0

    @staticmethod
    def _strip_port(lst: listener_pb2.Listener) -> None:
        for chain in lst.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    hcm = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    hcm.strip_any_host_port = True
                    f.typed_config.Pack(hcm)


async def run(n: int, evicted: int, settle: float, lb: str) -> None:
    print(f"# host-keyed routing probe: {n} services, {evicted} only on demand; "
          f"load {load_average()}")
    backend = await Backend("backend").start()
    activator = await Backend("activator").start()
    listen = free_port()
    table = [RoutedService(name=f"svc-{i:05d}", host=f"svc-{i:05d}.bench",
                           endpoints=(backend.endpoint,)) for i in range(n)]
    t0 = time.perf_counter()
    plane = HostPlane(table, activator.endpoint, listen, evicted, lb)
    print(f"build {time.perf_counter() - t0:.2f} s; route config "
          f"{plane.base_route.ByteSize()} B; {len(plane.base_clusters)} clusters up front")
    try:
        await serve_to_envoy(plane, "hostroute-", 10, lambda envoy, s: probe(
            envoy, plane, s, listen, table, activator, settle))
    finally:
        for b in (backend, activator):
            await b.stop()


async def probe(envoy: Envoy, plane: HostPlane, s: aiohttp.ClientSession, listen: int,
                table: list[RoutedService], activator: Backend, settle: float) -> None:
    t0 = time.perf_counter()
    plane.admin_port = envoy.admin_port
    await envoy.start()
    await wait_for(lambda: envoy.ready(s), 30, "envoy /ready")

    async def listening() -> bool:
        return (await get(s, listen, table[0].host))[0] == 200
    await wait_for(listening, 30, "listener")
    print(f"1. spawn -> ready and serving {time.perf_counter() - t0:.2f} s "
          f"(load {load_average()}); RSS {envoy.rss_mb():.0f} MB, heap "
          f"{await envoy.heap_mb(s):.0f} MB")
    await asyncio.sleep(settle)
    print(f"   {settle:.0f} s later: RSS {envoy.rss_mb():.0f} MB, heap "
          f"{await envoy.heap_mb(s):.0f} MB")
    async with s.get(f"http://{LOOPBACK}:{envoy.admin_port}/memory") as r:
        print(f"   /memory {' '.join((await r.text()).split())}")
    if "tcmalloc" in VARIANTS:
        async with s.get(f"http://{LOOPBACK}:{envoy.admin_port}/memory/tcmalloc") as r:
            print((await r.text())[:6000])

    print("2. requests by host:")
    cases = [("host", table[1].host), ("host with port", f"{table[2].host}:{listen}"),
             ("host in capitals", table[3].host.upper()), ("unknown host", "nobody.example")]
    for label, h in cases:
        code, body, dt = await get(s, listen, h)
        print(f"   {label:18} {h:28} -> {code} {body!r} {ms(dt)}")

    st = plane.streams[-1]
    adds = []
    for i in range(5):
        host = f"added-{i}.bench"
        cl = cluster_pb2.Cluster()
        plane.clusters[table[0].host].Unpack(cl)
        cl.name = host
        if cl.eds_cluster_config.service_name:
            cl.eds_cluster_config.service_name = host
        cla = endpoint_pb2.ClusterLoadAssignment()
        plane.clas[table[0].host].Unpack(cla)
        cla.cluster_name = host
        plane.clusters[host] = packed(cl)
        plane.clas[host] = packed(cla)
        t1 = time.perf_counter()
        ack = await asyncio.wait_for(st.send(types.CLUSTER, [discovery_pb2.Resource(
            name=host, version="1", resource=plane.clusters[host])]), 10)
        acked = time.perf_counter() - t1

        async def served(h: str = host) -> bool:
            return (await get(s, listen, h))[:2] == (200, "backend")
        await wait_for(served, 10, "added service")
        adds.append((ack, acked, time.perf_counter() - t1))
    print(f"3. add one service (cluster by CDS, its endpoints asked by EDS): ACK "
          f"{', '.join(ms(a[1]) for a in adds)}; first 200 "
          f"{', '.join(ms(a[2]) for a in adds)} (load {load_average()})")

    flips = []
    for i in range(20):
        host = table[10 + i].host
        cla = endpoint_pb2.ClusterLoadAssignment()
        plane.clas[host].Unpack(cla)
        cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = \
            activator.port
        t1 = time.perf_counter()
        if "static" in VARIANTS:  # the endpoints are in the cluster: a flip is a CDS update
            cl = cluster_pb2.Cluster()
            plane.clusters[host].Unpack(cl)
            cl.load_assignment.CopyFrom(cla)
            await asyncio.wait_for(st.send(types.CLUSTER, [discovery_pb2.Resource(
                name=host, version="2", resource=packed(cl))]), 10)
        else:
            await asyncio.wait_for(st.send(types.ENDPOINT, [discovery_pb2.Resource(
                name=host, version="2", resource=packed(cla))]), 10)
        flips.append(time.perf_counter() - t1)

        async def flipped(h: str = host) -> bool:
            return (await get(s, listen, h))[1] == "activator"
        await wait_for(flipped, 10, "flip")
    print(f"4. endpoint flip ACK p50 {ms(pct(flips, .5))} max {ms(max(flips))}")
    if "static" in VARIANTS:
        await in_flight_across_update(s, st, plane, table[40].host, listen, activator)

    if plane.evicted:
        firsts, seconds, bad = [], [], []
        for h in sorted(plane.evicted)[:20]:
            code, body, dt = await get(s, listen, h)
            (firsts if (code, body) == (200, "backend") else bad).append(dt)
            code2, _, dt2 = await get(s, listen, h)
            if code2 == 200:
                seconds.append(dt2)
        print(f"5. evicted service (ODCDS): first request p50 {ms(pct(firsts, .5))} max "
              f"{ms(max(firsts, default=0))}, ok {len(firsts)}/20; second p50 "
              f"{ms(pct(seconds, .5))}; failures {len(bad)}")
    unknown = [await get(s, listen, f"nobody-{i}.example") for i in range(5)]
    print(f"6. unknown hosts: {[u[:2] for u in unknown[:2]]} p50 "
          f"{ms(pct([u[2] for u in unknown], .5))}; CDS names asked "
          f"{[x for x in plane.requested.get('Cluster', []) if 'nobody' in x][:3]}")
    print(f"   RSS at the end {envoy.rss_mb():.0f} MB, heap {await envoy.heap_mb(s):.0f} MB")


async def in_flight_across_update(s: aiohttp.ClientSession, st: Any, plane: HostPlane,
                                  host: str, listen: int, activator: Backend) -> None:
    """A request in flight on a STATIC cluster when the cluster is replaced by CDS (a flip):
    is it answered?"""
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-backend: slow\r\n\r\nslow")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for target in (port, activator.port):
            cl = cluster_pb2.Cluster()
            plane.clusters[host].Unpack(cl)
            sock = cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
            sock.socket_address.port_value = target
            await asyncio.wait_for(st.send(types.CLUSTER, [discovery_pb2.Resource(
                name=host, version=f"v{target}", resource=packed(cl))]), 10)
            if target == port:
                held = asyncio.create_task(get(s, listen, host))
                await asyncio.sleep(0.3)  # the request reaches the slow backend
        await asyncio.sleep(0.3)  # the flip applied while the request is in flight
        release.set()
        code, body, _ = await held
        print(f"   a request in flight across the cluster's replacement: {code} {body!r}")
        other = "svc-00050.bench"
        for _ in range(5):
            await get(s, listen, other)
        before = await admin_stat(s, plane, other)
        cl = cluster_pb2.Cluster()
        plane.clusters[other].Unpack(cl)
        cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address \
            .port_value = activator.port
        await asyncio.wait_for(st.send(types.CLUSTER, [discovery_pb2.Resource(
            name=other, version="flip", resource=packed(cl))]), 10)
        await asyncio.sleep(0.2)
        after = await admin_stat(s, plane, other)
        await get(s, listen, other)
        print(f"   upstream_rq_total of a cluster before / after its replacement / after one "
              f"more request: {before} / {after} / {await admin_stat(s, plane, other)}")
    finally:
        server.close()


async def admin_stat(s: aiohttp.ClientSession, plane: HostPlane, host: str) -> str:
    envoy_admin = plane.admin_port
    async with s.get(f"http://{LOOPBACK}:{envoy_admin}/stats?filter="
                     f"cluster.{host.removesuffix('.bench')}.upstream_rq_total") as r:
        return (await r.text()).strip().rsplit(": ", 1)[-1] or "absent"


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--evicted", type=int, default=100,
                    help="services whose cluster Envoy gets only when asked (ODCDS)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds before RSS is read again (the allocator gives pages back)")
    ap.add_argument("--lb", default="", help="lb_policy of the services' clusters")
    ap.add_argument("--variant", default="", help="comma-separated: nocb, static, tcmalloc")
    a = ap.parse_args()
    VARIANTS.update(v for v in a.variant.split(",") if v)
    asyncio.run(run(a.services, a.evicted, a.settle, a.lb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
