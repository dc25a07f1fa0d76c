"""On-demand discovery probe: would VHDS (virtual hosts on demand) and ODCDS (clusters on
demand) let Envoy carry 10,000 torpor services in less memory and with cheap adds?

    python bench/ondemand_probe.py [--services 10000] [--mode odcds|cds] [--catch-all]

An experiment, not product code. It builds torpor's own resources for N services
(xds_server.resources.ResourceBuilder: one EDS cluster, one ClusterLoadAssignment and one
virtual host each), then serves them from a minimal delta-ADS servicer of its own:
  * LDS: torpor's listener with `envoy.filters.http.on_demand` put before the router
    (with `odcds` over ADS in --mode odcds);
  * RDS: one RouteConfiguration with `vhds` over ADS and no per-service virtual host;
    it keeps the wildcard host `*.wild.bench` and, with --catch-all, torpor's `*` vhost;
  * VHDS: a service's virtual host when Envoy asks for `<route config>/<Host>`;
    an unknown host is answered with the alias in removed_resources (not found);
  * CDS: the activator's cluster, plus every service cluster up front in --mode cds, or
    each on request in --mode odcds; EDS: each ClusterLoadAssignment when asked for.
It prints Envoy's RSS and heap after the base sync, the first request to an unloaded
service (on-demand round trip) and a second one, RSS after 1,000 and N services were used,
what removing them does, an endpoint flip and a route change of a loaded service, and what
happens to unknown hosts, wildcard hosts, a Host with a port or in capitals, and HTTP/2.

Wall-clock figures move with the machine's load: the load average is printed beside them.
Everything listens on 127.0.0.1; every process it starts is stopped in a finally block;
every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xds_scale import Backend, EnvoyProcess, free_port, load_average, rss_kb

from torpor.config import Address
from torpor.model import Endpoint
from xds_server import types
from xds_server.bootstrap import bootstrap
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService

LOOPBACK = "127.0.0.1"
VHOST = types.PREFIX + "envoy.config.route.v3.VirtualHost"
WILD = "*.wild.bench"
REQ_TIMEOUT = 10.0


def host_of(alias: str) -> str:
    """`<route config>/<host[:port]>` -> the lower-case host without port."""
    host = alias.split("/", 1)[1] if "/" in alias else alias
    return host.rsplit(":", 1)[0].lower() if ":" in host else host.lower()


class Plane:
    """What the probe serves: torpor's resources for N services, split into a base set and
    on-demand ones. Answers each delta subscription and records every (N)ACK."""

    def __init__(self, table: list[RoutedService], activator: Endpoint, listen: int,
                 mode: str, catch_all: bool, fetch_timeout_ms: int = 1) -> None:
        builder = ResourceBuilder(GatewaySettings(listen=Endpoint(LOOPBACK, listen),
                                                  activators=(activator,)))
        built = builder.build(table)
        self.mode = mode
        self.clusters = {n: r.body for n, r in built[types.CLUSTER].items()}
        self.clas = {n: r.body for n, r in built[types.ENDPOINT].items()}
        route = route_pb2.RouteConfiguration()
        next(iter(built[types.ROUTE].values())).body.Unpack(route)
        self.vhosts: dict[str, route_components_pb2.VirtualHost] = {}
        base = route_pb2.RouteConfiguration()
        base.CopyFrom(route)
        del base.virtual_hosts[:]
        self.catch_all: route_components_pb2.VirtualHost | None = None
        for vh in route.virtual_hosts:
            if "*" in vh.domains:
                self.catch_all = vh
                if catch_all:
                    base.virtual_hosts.append(vh)
                continue
            for d in vh.domains:
                if not d.endswith(":*"):
                    self.vhosts[d.lower()] = vh
        self.service_cluster = {s.host: self._cluster_of(self.vhosts[s.host]) for s in table}
        # one wildcard vhost in the base config, to the first service's cluster
        first = table[0].host
        wild = route_components_pb2.VirtualHost()
        wild.CopyFrom(self.vhosts[first])
        wild.name = "wild"
        del wild.domains[:]
        wild.domains.append(WILD)
        base.virtual_hosts.insert(0, wild)
        base.vhds.config_source.ads.SetInParent()
        base.vhds.config_source.resource_api_version = 2  # V3
        # Envoy's first VHDS request names nothing; a response naming nothing reaches no
        # watch, so the route config (and the listener) would wait out the default 15 s
        if fetch_timeout_ms:
            base.vhds.config_source.initial_fetch_timeout.FromMilliseconds(fetch_timeout_ms)
        self.route_name = route.name
        self.base_route = base
        self.listeners = {}
        for name, r in built[types.LISTENER].items():
            lst = listener_pb2.Listener()
            r.body.Unpack(lst)
            self._add_on_demand(lst)
            self.listeners[name] = lst
        base_clusters = [n for n in self.clusters if not n.startswith("svc-")]
        self.base_clusters = set(self.clusters) if mode == "cds" else set(base_clusters)
        self.streams: list[Stream] = []
        self.not_found = "empty"
        self.first_requests: dict[str, list[str]] = {}
        self.vhost_version: dict[str, int] = {}
        self.requested: dict[str, list[str]] = {}  # type short -> names asked for, in order

    @staticmethod
    def _cluster_of(vh: route_components_pb2.VirtualHost) -> str:
        clusters = [r.route.cluster for r in vh.routes if r.route.cluster.startswith("svc-")]
        return clusters[0] if clusters else ""

    def _add_on_demand(self, lst: listener_pb2.Listener) -> None:
        """Put envoy.filters.http.on_demand before the router of every HCM."""
        for chain in lst.filter_chains:
            for f in chain.filters:
                if not f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                od = on_demand_pb2.OnDemand()
                if self.mode == "odcds":
                    od.odcds.source.ads.SetInParent()
                    od.odcds.source.resource_api_version = 2
                    od.odcds.timeout.FromMilliseconds(5000)
                filt = hcm_pb2.HttpFilter(name="envoy.filters.http.on_demand")
                filt.typed_config.Pack(od)
                filters = list(hcm.http_filters)
                at = next((i for i, h in enumerate(filters) if "router" in h.name), len(filters))
                filters.insert(at, filt)
                del hcm.http_filters[:]
                hcm.http_filters.extend(filters)
                f.typed_config.Pack(hcm)

    def vhost_resource(self, alias: str) -> discovery_pb2.Resource | None:
        host = host_of(alias)
        vh = self.vhosts.get(host)
        if vh is None:
            return None
        body = any_pb2.Any()
        body.Pack(vh)
        return discovery_pb2.Resource(name=f"{self.route_name}/{host}", aliases=[alias],
                                      version=str(self.vhost_version.get(host, 1)),
                                      resource=body)


class Stream:
    """One Envoy's delta ADS stream: what it subscribed, and ACK waiters by nonce."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.out: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | None] = asyncio.Queue()
        self.nonce = 0
        self.acks: dict[str, asyncio.Future[str]] = {}
        self.subscribed: dict[str, set[str]] = {}
        self.nacks: list[str] = []

    def send(self, type_url: str, resources: list[discovery_pb2.Resource],
             removed: list[str] = ()) -> asyncio.Future[str]:  # type: ignore[assignment]
        self.nonce += 1
        nonce = str(self.nonce)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.acks[nonce] = fut
        self.out.put_nowait(discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, resources=resources, removed_resources=list(removed),
            nonce=nonce, system_version_info=nonce))
        return fut

    def handle(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        t = req.type_url
        if req.response_nonce:
            fut = self.acks.pop(req.response_nonce, None)
            if req.error_detail.message:
                self.nacks.append(f"{t.rsplit('.', 1)[-1]}: {req.error_detail.message[:300]}")
            if fut is not None and not fut.done():
                fut.set_result("nack" if req.error_detail.message else "ack")
        first = t not in self.subscribed
        subs = self.subscribed.setdefault(t, set())
        # every name in a subscribe is answered, also one already subscribed: Envoy asks
        # again for a resource the control plane removed
        new = [n for n in req.resource_names_subscribe if n != "*"]
        subs.update(req.resource_names_subscribe)
        subs.difference_update(req.resource_names_unsubscribe)
        short = t.rsplit(".", 1)[-1]
        self.plane.requested.setdefault(short, []).extend(new)
        p = self.plane
        wildcard = first and (not req.resource_names_subscribe
                             or "*" in req.resource_names_subscribe)
        if first:
            self.plane.first_requests[short] = list(req.resource_names_subscribe)[:3]

        def pack(msg: Any) -> any_pb2.Any:
            a = any_pb2.Any()
            a.Pack(msg)
            return a

        if t == types.LISTENER and first:
            self.send(t, [discovery_pb2.Resource(name=n, version="1", resource=pack(v))
                          for n, v in p.listeners.items()])
        elif t == types.CLUSTER:
            names = sorted(p.base_clusters) if wildcard else []
            names += [n for n in new if n != "*" and n in p.clusters and n not in names]
            missing = [n for n in new if n != "*" and n not in p.clusters]
            if names or missing or first:
                self.send(t, [discovery_pb2.Resource(name=n, version="1", resource=p.clusters[n])
                              for n in names], missing)
        elif t == types.ENDPOINT:
            found = [n for n in new if n in p.clas]
            if found:
                self.send(t, [discovery_pb2.Resource(name=n, version="1", resource=p.clas[n])
                              for n in found])
        elif t == types.ROUTE:
            if p.route_name in new:
                self.send(t, [discovery_pb2.Resource(name=p.route_name, version="1",
                                                     resource=pack(p.base_route))])
        elif t == VHOST:
            res, gone = [], []
            for alias in new:
                if "/" not in alias:
                    continue
                r = p.vhost_resource(alias)
                if r is None and p.not_found == "removed":
                    gone.append(alias)
                elif r is None:  # a Resource with the alias and no body: "does not exist"
                    res.append(discovery_pb2.Resource(name=alias, aliases=[alias]))
                else:
                    res.append(r)
            if first and not res and not gone:
                self.send(t, [])  # the initial (wildcard-less) VHDS request: nothing yet
            elif res or gone:
                self.send(t, res, gone)


class Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, plane: Plane) -> None:
        self.plane = plane

    async def DeltaAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[
                discovery_pb2.DeltaDiscoveryResponse]:
        stream = Stream(self.plane)
        self.plane.streams.append(stream)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    stream.handle(req)
            finally:
                stream.out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (resp := await stream.out.get()) is not None:
                yield resp
        finally:
            reader.cancel()


# --- Envoy -------------------------------------------------------------------------------


class Envoy(EnvoyProcess):
    """xds_scale's Envoy on a bootstrap of torpor's, to this probe's control plane, with its
    admin on `admin_port` and its output in `log`."""

    def __init__(self, workdir: Path, xds_port: int) -> None:
        self.admin_port = free_port()
        boot = workdir / "bootstrap.json"
        boot.write_text(json.dumps(bootstrap("probe", Address(LOOPBACK, self.admin_port),
                                             Address(LOOPBACK, xds_port))))
        self.log = workdir / "envoy.log"
        super().__init__(boot, self.log, Address(LOOPBACK, self.admin_port))

    def rss_mb(self) -> float:
        return rss_kb(self.proc.pid) / 1024 if self.proc else 0.0

    async def heap_mb(self, s: aiohttp.ClientSession) -> float:
        async with s.get(f"http://{LOOPBACK}:{self.admin_port}/memory") as r:
            return int((await r.json())["allocated"]) / 1048576

    async def ready(self, s: aiohttp.ClientSession) -> bool:
        try:
            async with s.get(f"http://{LOOPBACK}:{self.admin_port}/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def stat(self, s: aiohttp.ClientSession, name: str) -> str:
        async with s.get(f"http://{LOOPBACK}:{self.admin_port}/stats?filter={name}") as r:
            return (await r.text()).strip()


async def wait_for(cond: Any, deadline: float, what: str) -> None:
    end = time.perf_counter() + deadline
    while time.perf_counter() < end:
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(what)


async def get(s: aiohttp.ClientSession, port: int, host: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        async with s.get(f"http://{LOOPBACK}:{port}/v1/x", headers={"Host": host}) as r:
            body = await r.text()
            return r.status, body[:40], time.perf_counter() - t0
    except (aiohttp.ClientError, TimeoutError) as e:
        return -1, type(e).__name__, time.perf_counter() - t0


async def curl_h2(port: int, host: str) -> str:
    p = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version} %{time_total}",
        "--http2-prior-knowledge", "-m", "10", "-H", f"Host: {host}",
        f"http://{LOOPBACK}:{port}/v1/x", stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    return out.decode()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


# --- the run -------------------------------------------------------------------------------


async def run(n: int, mode: str, catch_all: bool, not_found: str, remove: str,
              fetch_timeout_ms: int, load_upto: int, remove_by: str) -> None:
    print(f"# on-demand probe: {n} services, clusters by {mode}, catch-all * in base: "
          f"{catch_all}; load {load_average()}")
    backend = await Backend("backend").start()
    other = await Backend("other").start()
    activator = await Backend("activator").start()
    listen = free_port()
    table = [RoutedService(name=f"svc-{i:05d}", host=f"svc-{i:05d}.bench",
                           endpoints=(backend.endpoint,)) for i in range(n)]
    t0 = time.perf_counter()
    plane = Plane(table, activator.endpoint, listen, mode, catch_all, fetch_timeout_ms)
    plane.not_found = not_found
    print(f"build {time.perf_counter() - t0:.2f} s; base route config "
          f"{plane.base_route.ByteSize()} B, one vhost "
          f"{plane.vhosts[table[0].host].ByteSize()} B")
    try:
        await serve_to_envoy(plane, "ondemand-", REQ_TIMEOUT, lambda envoy, s: probe(
            envoy, plane, s, listen, table, n, activator, remove, load_upto, remove_by))
    finally:
        for b in (backend, other, activator):
            await b.stop()


async def serve_to_envoy(plane: Plane, prefix: str, timeout: float,
                         body: Callable[[Envoy, aiohttp.ClientSession], Awaitable[None]]
                         ) -> None:
    """Serve `plane` over delta ADS to a fresh Envoy and run `body(envoy, session)`; then
    print the NACKs and the end of Envoy's log, and stop Envoy and the server."""
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Servicer(plane), server)
    xds_port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    envoy: Envoy | None = None
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            envoy = Envoy(Path(tmp), xds_port)
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                try:
                    await body(envoy, s)
                finally:
                    nacks = [x for st in plane.streams for x in st.nacks]
                    print(f"NACKs: {len(nacks)} {nacks[:3]}")
                    tail = envoy.log.read_text(errors="replace")[-1500:] if envoy.log.exists() \
                        else ""
                    if tail.strip():
                        print("envoy log tail:\n" + tail)
    finally:
        if envoy is not None:
            await envoy.stop()
        await server.stop(1)


async def probe(envoy: Envoy, plane: Plane, s: aiohttp.ClientSession, listen: int,
                table: list[RoutedService], n: int, activator: Backend, remove: str,
                load_upto: int, remove_by: str) -> None:
    # 1. base sync
    t0 = time.perf_counter()
    await envoy.start()
    await wait_for(lambda: envoy.ready(s), 30, "envoy /ready")

    async def listening() -> bool:
        st, _, _ = await get(s, listen, "nothing.example")
        return st != -1
    await wait_for(listening, 30, "listener")
    sync = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    print(f"1. spawn -> ready+listening {sync:.2f} s (load {load_average()}); "
          f"RSS {envoy.rss_mb():.0f} MB, heap {await envoy.heap_mb(s):.0f} MB")
    print(f"   initial CDS size: {len(plane.base_clusters)} clusters; first subscriptions "
          f"{plane.first_requests}")

    # 2. first request to an unloaded service, then a second one
    first, second, bad = [], [], []
    for i in range(1, 51):
        host = table[i * (n // 60)].host
        st, body, dt = await get(s, listen, host)
        (first if st == 200 and body == "backend" else bad).append(dt)
        if st != 200 or body != "backend":
            bad[-1] = (host, st, body)  # type: ignore[call-overload]
        st2, _, dt2 = await get(s, listen, host)
        if st2 == 200:
            second.append(dt2)
    print(f"2. first request (on-demand) p50 {ms(pct(first, .5))} p99 {ms(pct(first, .99))} "
          f"ok {len(first)}/50; second p50 {ms(pct(second, .5))} p99 {ms(pct(second, .99))} "
          f"(load {load_average()}); failures {bad[:3]}")
    print(f"   Envoy asked: VHDS {plane.requested.get('VirtualHost', [])[:2]}, "
          f"CDS {[x for x in plane.requested.get('Cluster', []) if x != '*'][:2]}, "
          f"EDS {plane.requested.get('ClusterLoadAssignment', [])[:2]}")
    print(f"   RSS {envoy.rss_mb():.0f} MB after 50 services")

    # 3. adding a service: nothing is pushed until Envoy asks; count what is subscribed
    st = plane.streams[-1]
    print(f"3. add one service: no push (Envoy subscribed to {len(st.subscribed.get(VHOST, ()))} "
          f"vhosts, {len(st.subscribed.get(types.CLUSTER, ()))} clusters); the control plane only "
          "records it; its first request pays the round trip of 2.")

    spare = {x.host for x in table[-12:]}  # kept unloaded for the edge cases
    if plane.mode == "cds":  # adding a service is one new cluster (+ its CLA on request)
        from envoy.config.cluster.v3 import cluster_pb2
        cl = cluster_pb2.Cluster()
        plane.clusters[plane.service_cluster[table[0].host]].Unpack(cl)
        cl.name = "svc-added"
        if cl.eds_cluster_config.service_name:
            cl.eds_cluster_config.service_name = cl.name
        body = any_pb2.Any()
        body.Pack(cl)
        plane.clusters[cl.name] = body
        plane.clas[cl.name] = plane.clas[plane.service_cluster[table[0].host]]

        async def active() -> int:
            line = await envoy.stat(s, "cluster_manager.active_clusters")
            return int(line.rsplit(":", 1)[1])
        before = await active()
        t1 = time.perf_counter()
        ack = await asyncio.wait_for(st.send(types.CLUSTER, [discovery_pb2.Resource(
            name=cl.name, version="1", resource=body)]), 10)
        acked = time.perf_counter() - t1

        async def warmed() -> bool:
            return await active() > before
        await wait_for(warmed, 10, "added cluster")
        print(f"   add one cluster by CDS at {before} clusters: {ack} {ms(acked)}, active "
              f"{ms(time.perf_counter() - t1)} (load {load_average()})")

    # 5. endpoint flip and route change of a loaded service
    host = table[1].host
    cname = plane.service_cluster[host]
    await get(s, listen, host)
    cla = endpoint_pb2.ClusterLoadAssignment()
    plane.clas[cname].Unpack(cla)
    sock = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    sock.port_value = activator.port
    body_any = any_pb2.Any()
    body_any.Pack(cla)
    t1 = time.perf_counter()
    ack = st.send(types.ENDPOINT, [discovery_pb2.Resource(name=cname, version="2",
                                                           resource=body_any)])
    ack_s = (await asyncio.wait_for(ack, 10), time.perf_counter() - t1)

    async def seen(target: str) -> bool:
        return (await get(s, listen, host))[1] == target
    await wait_for(lambda: seen("activator"), 10, "flip")
    print(f"5. EDS flip of a loaded service: {ack_s[0]} {ms(ack_s[1])}, visible "
          f"{ms(time.perf_counter() - t1)}")
    vh = route_components_pb2.VirtualHost()
    vh.CopyFrom(plane.vhosts[host])
    for r in vh.routes:
        if r.route.cluster == cname:
            r.route.cluster = plane.service_cluster[table[2].host]  # points at backend
    plane.vhosts[host] = vh
    plane.vhost_version[host] = 2
    res = plane.vhost_resource(f"{plane.route_name}/{host}")
    assert res is not None
    t1 = time.perf_counter()
    ack = st.send(VHOST, [res])
    ack_s = (await asyncio.wait_for(ack, 10), time.perf_counter() - t1)
    try:
        await wait_for(lambda: seen("backend"), 10, "route change")
        vis = ms(time.perf_counter() - t1)
    except TimeoutError:
        vis = "never (10 s)"
    print(f"   VHDS route change of a loaded vhost: {ack_s[0]} {ms(ack_s[1])}, visible {vis}")

    # 6. edge cases
    print("6. edge cases (status, body, time):")
    cases = [("unknown host", "nobody.example"),
             ("wildcard host (base)", "a.wild.bench"),
             ("unloaded host with port", f"{table[-1].host}:{listen}"),
             ("unloaded host in capitals", table[-2].host.upper()),
             ("loaded host with port", f"{table[3].host}:{listen}"),
             ("loaded host in capitals", table[4].host.upper())]
    for label, h in cases:
        code, body, dt = await get(s, listen, h)
        print(f"   {label:28} {h:28} -> {code} {body!r} {ms(dt)}")
    print(f"   HTTP/2 (h2c) unloaded {table[-3].host}: {await curl_h2(listen, table[-3].host)}")
    print(f"   HTTP/2 (h2c) loaded   {table[5].host}: {await curl_h2(listen, table[5].host)}")
    print(f"   HTTP/2 (h2c) unknown host: {await curl_h2(listen, 'nobody2.example')}")
    asked = plane.requested.get("VirtualHost", [])
    odd = [a for a in asked if ":" in a or "SVC" in a or "nobody" in a]
    print(f"   VHDS names asked for (port, capitals, unknown): {odd[:6]}")
    # 4. RSS after 1,000 and all services requested once
    sem = asyncio.Semaphore(8)

    async def one(h: str) -> int:
        async with sem:
            return (await get(s, listen, h))[0]

    for upto in sorted({min(1000, n), min(load_upto, n)}):
        t1 = time.perf_counter()
        codes = await asyncio.gather(*(one(x.host) for x in table[:upto] if x.host not in spare))
        ok = sum(c == 200 for c in codes)
        await asyncio.sleep(0.5)
        print(f"4. after {upto} services requested ({ok} ok, {time.perf_counter() - t1:.1f} s, "
              f"load {load_average()}): RSS {envoy.rss_mb():.0f} MB, heap "
              f"{await envoy.heap_mb(s):.0f} MB")
    # remove on-demand vhosts and clusters of all but 100 services with removed_resources
    keep = {x.host for x in table[:100]} | spare
    drop_hosts = [x.host for x in table if x.host not in keep]
    # Envoy drops a VHDS virtual host by its VirtualHost.name, not by the Resource name
    vnames = ([plane.vhosts[h].name for h in drop_hosts] if remove_by == "vhost-name"
              else [f"{plane.route_name}/{h}" for h in drop_hosts])
    t1 = time.perf_counter()
    acks = [await asyncio.wait_for(st.send(VHOST, [], vnames), 60)]
    if plane.mode == "odcds" and remove == "both":
        acks.append(await asyncio.wait_for(
            st.send(types.CLUSTER, [], [plane.service_cluster[h] for h in drop_hosts]), 60))
    await asyncio.sleep(1.0)
    print(f"   removed {len(drop_hosts)} vhosts{' + clusters' if len(acks) > 1 else ''}:"
          f" {acks} in {time.perf_counter() - t1:.2f} s; RSS {envoy.rss_mb():.0f} MB, heap "
          f"{await envoy.heap_mb(s):.0f} MB; "
          f"{await envoy.stat(s, 'cluster_manager.active_clusters')}")
    h = drop_hosts[0]
    code, body, dt = await get(s, listen, h)
    print(f"   request to a removed service: {code} {body} in {ms(dt)} (Envoy asked for it: "
          f"VHDS {plane.requested['VirtualHost'].count(f'{plane.route_name}/{h}')}x, CDS "
          f"{plane.requested.get('Cluster', []).count(plane.service_cluster[h])}x)")

    for label, h in (("removed service again", drop_hosts[1]),
                     ("removed service, capitals", drop_hosts[2].upper())):
        code, body, dt = await get(s, listen, h)
        print(f"   {label}: {code} {body!r} in {ms(dt)}")


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--mode", choices=("odcds", "cds"), default="odcds")
    ap.add_argument("--catch-all", action="store_true")
    ap.add_argument("--not-found", choices=("empty", "removed"), default="empty",
                    help="answer an unknown host with a body-less Resource or removed_resources")
    ap.add_argument("--remove", choices=("vhosts", "both"), default="both",
                    help="what the control plane removes of idle services (odcds mode)")
    ap.add_argument("--remove-by", choices=("resource-name", "vhost-name"),
                    default="vhost-name", help="names sent in removed_resources for vhosts")
    ap.add_argument("--load-upto", type=int, default=1000,
                    help="services requested once in step 4 (each VHDS load rebuilds the "
                         "whole route table: 10,000 takes tens of minutes)")
    ap.add_argument("--vhds-fetch-timeout-ms", type=int, default=1,
                    help="vhds config_source initial_fetch_timeout (0: Envoy's 15 s default)")
    a = ap.parse_args()
    asyncio.run(run(a.services, a.mode, a.catch_all, a.not_found, a.remove,
                    a.vhds_fetch_timeout_ms, a.load_upto, a.remove_by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
