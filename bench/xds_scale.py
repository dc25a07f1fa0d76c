"""xDS at scale: torpor's control plane driving real Envoys with 1,000 and 10,000 services,
over delta and state-of-the-world ADS.

    python bench/xds_scale.py [--sizes 1000,10000] [--envoys 1] [--protocols delta,sotw]

For each size N and each protocol, with a fresh control plane and fresh Envoy(s)
bootstrapped with that ADS variant (`ads_config.api_type` DELTA_GRPC or GRPC), this prints:
  (a) time to full sync: from building the first snapshot of N services (one EDS cluster,
      one ClusterLoadAssignment and one virtual host each) until every Envoy has ACKed
      every type at that version and answers /ready;
  (b) one endpoint flip through Publisher.publish, --flips times: push -> all
      Envoys ACKed, and push -> first response from the new backend seen by a client
      polling that service through Envoy's listener (median, p99, max), and what the
      control plane sent for it (resources and their bytes, summed over the Envoys);
  (c) adding one service (staged: CDS+EDS, then RDS): push -> all Envoys ACKed, and the
      resources and bytes sent;
  (d) memory after sync: this process's VmRSS and its growth over a baseline taken before
      the resources were built, each Envoy's VmRSS, and the RouteConfiguration's size.

A benchmark prints figures; it never passes or fails on time. It stands alone with the
torpor package (of tests.support only the port reservation): it reuses xds_server.* and
torpor.gateway, and wires them itself. Everything listens on 127.0.0.1; every process it
starts is stopped in a finally block; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse
from envoy.service.discovery.v3.discovery_pb2 import Resource as ResourceMessage

from torpor.config import ROUTING_MODES, XDS_PROTOCOLS, Address
from torpor.gateway import envoy_binary
from torpor.model import Endpoint
from xds_server import types
from xds_server.bootstrap import bootstrap, releases_memory
from xds_server.cache import Desired, SnapshotCache
from xds_server.collector import CallCollector
from xds_server.publisher import Publisher
from xds_server.quarantine import QuarantineBuilder
from xds_server.resources import ROUTE_CONFIG_NAME, GatewaySettings, RoutedService
from xds_server.server import AdsServer
from xds_server.serving import start_xds_listener

LOOPBACK = "127.0.0.1"
#: Flips per run (--flips): a p99 needs ~100 samples or more to be more than the largest.
FLIPS = 200
ADDS = 3
FLIP_VISIBLE_DEADLINE = 5.0  # s: a flip that never shows within this is reported, not waited on
ACK_TIMEOUT = 30.0  # s: the publisher's wait for every Envoy to apply a stage
ALL_TYPES = frozenset({"cds", "eds", "lds", "rds"})  # no TLS here: no SDS


# --- small wiring -----------------------------------------------------------------------


def free_port() -> int:
    """A port reserved for this run outside the kernel's ephemeral range (Envoy's ports must
    be chosen up front; the tests' one reservation, tests/support/net.py: a port found free
    by binding port 0 races)."""
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)  # tests.support is not installed with torpor
    from tests.support.net import free_port as reserved_port

    return reserved_port()


def load_average() -> str:
    """The 1-minute load average: wall-clock figures move with the machine's other load."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS of a process in kB, from /proc/<pid>/status (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Backend:
    """An aiohttp server on loopback that answers every request with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(LOOPBACK, self.port)

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class LoopMonitor:
    """The longest the event loop went without running a 5 ms timer (its worst stall)."""

    INTERVAL = 0.005

    def __init__(self) -> None:
        self.max_stall = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.INTERVAL)
            self.max_stall = max(self.max_stall, loop.time() - before - self.INTERVAL)

    def take(self) -> float:
        """The worst stall since the last take(), and reset."""
        value, self.max_stall = self.max_stall, 0.0
        return value

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class PushLog(logging.Handler):
    """Collects the publisher's own per-stage timings (its `xds.pushed` debug events)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.pushes: list[tuple[int, float]] = []  # (version, seconds)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "xds.pushed":
            self.pushes.append((int(record.__dict__["version"]), float(record.__dict__["seconds"])))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        logger = logging.getLogger("torpor.xds")
        old_level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)  # root has no handler: debug records print nowhere
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(old_level)


class EnvoyProcess:
    """One Envoy on a bootstrap file, its output in `log_path`; `stop()` ends it."""

    def __init__(self, bootstrap_path: Path, log_path: Path, admin: Address) -> None:
        self.bootstrap_path = bootstrap_path
        self.log_path = log_path
        self.admin = admin
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                envoy_binary(), "-c", str(self.bootstrap_path), "--disable-hot-restart",
                "--log-level", "warning", "--concurrency", "2",
                stdout=log, stderr=asyncio.subprocess.STDOUT)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Envoys:
    """K Envoys bootstrapped to one xDS port; all share the listener from the snapshot."""

    def __init__(self, workdir: Path, count: int, xds_port: int, protocol: str,
                 routing: str = "virtual_hosts") -> None:
        self.processes: list[EnvoyProcess] = []
        for i in range(count):
            admin = Address(LOOPBACK, free_port())
            boot = workdir / f"envoy-{i}.json"
            boot.write_text(json.dumps(bootstrap(
                f"bench-{i}", admin, Address(LOOPBACK, xds_port), xds_protocol=protocol,
                release_memory=releases_memory(routing))))
            self.processes.append(EnvoyProcess(boot, workdir / f"envoy-{i}.log", admin))

    async def start(self) -> None:
        for envoy in self.processes:
            await envoy.start()

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.processes), return_exceptions=True)

    def pids(self) -> list[int]:
        return [e.proc.pid for e in self.processes if e.proc is not None]

    def log_tails(self, chars: int = 1500) -> str:
        out = []
        for e in self.processes:
            if e.log_path.exists():
                text = e.log_path.read_text(errors="replace")
                out.append(f"--- {e.log_path.name}\n{text[-chars:]}")
        return "\n".join(out)

    @staticmethod
    async def allocated_kb(session: aiohttp.ClientSession, envoy: EnvoyProcess) -> int:
        """What Envoy's heap has allocated now (admin /memory `allocated`): unlike VmRSS it
        does not count freed pages the allocator has not yet given back."""
        async with session.get(f"http://{envoy.admin.host}:{envoy.admin.port}/memory") as r:
            return int((await r.json())["allocated"]) // 1024

    async def all_ready(self, session: aiohttp.ClientSession) -> bool:
        """True when every Envoy's admin /ready answers 200 (LIVE); raises if one exited."""
        for e in self.processes:
            if e.proc is None or e.proc.returncode is not None:
                raise RuntimeError(f"envoy exited (see log below)\n{self.log_tails()}")
            try:
                async with session.get(f"http://{e.admin.host}:{e.admin.port}/ready") as r:
                    if r.status != 200:
                        return False
            except (aiohttp.ClientError, TimeoutError):
                return False
        return True


def services(n: int, endpoint: Endpoint) -> list[RoutedService]:
    return [service(f"svc-{i:05d}", endpoint) for i in range(n)]


def service(name: str, endpoint: Endpoint) -> RoutedService:
    return RoutedService(name=name, host=f"{name}.bench", endpoints=(endpoint,))


# --- one size ---------------------------------------------------------------------------


#: gateway.routing as the table prints it.
ROUTING_SHORT = {"virtual_hosts": "vhosts", "host_header": "host"}


@dataclasses.dataclass
class Result:
    size: int
    envoys: int
    protocol: str
    routing: str = "virtual_hosts"  # gateway.routing
    build_s: float = 0.0  # first ResourceBuilder.build of N services (blocks the loop)
    acked_s: float = 0.0  # start -> every Envoy ACKed every type at the first version
    sync_s: float = 0.0  # start -> ACKed and every Envoy /ready
    envoy_sync_s: float = 0.0  # Envoy spawned -> ACKed and /ready (the part after the build)
    flip_ack: list[float] = dataclasses.field(default_factory=list)
    flip_seen: list[float] = dataclasses.field(default_factory=list)
    flip_build: list[float] = dataclasses.field(default_factory=list)
    flips_not_seen: int = 0
    add_ack: list[float] = dataclasses.field(default_factory=list)
    add_stages: list[list[float]] = dataclasses.field(default_factory=list)
    add_build: list[float] = dataclasses.field(default_factory=list)
    flip_sent: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (res, bytes)
    add_sent: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    sync_bytes: int = 0
    cp_rss_kb: int = 0
    cp_baseline_kb: int = 0
    envoy_rss_kb: list[int] = dataclasses.field(default_factory=list)
    envoy_allocated_kb: list[int] = dataclasses.field(default_factory=list)  # admin /memory
    envoy_rss_later_kb: list[int] = dataclasses.field(default_factory=list)  # after the flips
    load_average: str = ""  # /proc/loadavg (1 min) when the sync began
    rds_bytes: int = 0
    cds_bytes: int = 0
    eds_bytes: int = 0
    stall_sync: float = 0.0
    stall_flip: float = 0.0
    stall_add: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


def fully_synced(ads: AdsServer, envoys: int, version: int) -> bool:
    """Every expected Envoy has a stream, and each stream applied every type at `version`.

    AdsServer.wait_synced alone is not enough at start-up: it only sees the types a
    stream has asked for so far (EDS and RDS come after CDS and LDS), and with no stream
    connected yet there is nothing for it to wait for.
    """
    streams = ads.streams()
    if len(streams) < envoys:
        return False
    return all(
        set(s.synced_versions) >= ALL_TYPES
        and all(v >= version for v in s.synced_versions.values())
        for s in streams
    )


def sent(ads: AdsServer) -> tuple[int, int]:
    """Resources and their bytes sent so far on every stream (delta: removals count as
    resources, with no bytes)."""
    streams = ads.streams()
    return sum(s.resources_sent for s in streams), sum(s.bytes_sent for s in streams)


async def run_size(n: int, envoy_count: int, protocol: str, a: Backend, b: Backend,
                   monitor: LoopMonitor, routing: str = "virtual_hosts",
                   flip_count: int = FLIPS) -> Result:
    res = Result(size=n, envoys=envoy_count, protocol=protocol, routing=routing)
    deadline_sync = 30.0 + n * 0.004  # generous: Envoy takes ~4-5 s to load 10k
    gc.collect()
    res.cp_baseline_kb = rss_kb()
    push_log = PushLog()
    server: grpc.aio.Server | None = None
    envoys: Envoys | None = None
    with tempfile.TemporaryDirectory(prefix="xds-scale-") as tmp, push_log.installed():
        listen_port = free_port()
        settings = GatewaySettings(listen=Endpoint(LOOPBACK, listen_port),
                                   activators=(a.endpoint,), routing=routing)
        builder = QuarantineBuilder(settings)  # the control plane's: checks each service
        cache = SnapshotCache()
        ads = AdsServer(cache)
        publisher = Publisher(cache, ads, ack_timeout=ACK_TIMEOUT)
        table = services(n, a.endpoint)
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # (a) full sync ---------------------------------------------------------
                monitor.take()
                res.load_average = load_average()
                started = time.perf_counter()
                first = builder.build(table)
                res.build_s = time.perf_counter() - started
                snapshot = publisher.load(Desired(first))  # desired state before any stream
                gc.freeze()  # as the control plane does after its first load
                server, xds_port = await start_xds_listener(f"{LOOPBACK}:0", ads,
                                                            CallCollector())
                envoys = Envoys(Path(tmp), envoy_count, xds_port, protocol, routing)
                spawned = time.perf_counter()
                await envoys.start()
                deadline = started + deadline_sync
                acked = ready = 0.0
                while not (acked and ready):
                    if time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"no full sync after {deadline_sync:.0f}s: "
                            f"{ads.lagging(snapshot.version) or 'streams missing'}\n"
                            f"{envoys.log_tails()}")
                    if not acked:
                        await ads.wait_synced(snapshot.version, 0.05)
                        if fully_synced(ads, envoy_count, snapshot.version):
                            acked = time.perf_counter()
                    if not ready and await envoys.all_ready(session):
                        ready = time.perf_counter()
                    if not (acked and ready):
                        await asyncio.sleep(0.01)
                res.acked_s = acked - started
                res.sync_s = max(acked, ready) - started
                res.envoy_sync_s = max(acked, ready) - spawned
                res.stall_sync = monitor.take()
                res.sync_bytes = sent(ads)[1]
                if {s.protocol for s in ads.streams()} != {protocol}:
                    raise RuntimeError(f"Envoys speak {[s.protocol for s in ads.streams()]}, "
                                       f"not {protocol}")
                nacks = [s.nacks for s in ads.streams() if s.nacks]
                if nacks:
                    raise RuntimeError(f"Envoy rejected the snapshot: {nacks}")

                # (d) memory and sizes, right after sync --------------------------------
                gc.collect()
                res.cp_rss_kb = rss_kb()
                res.envoy_rss_kb = [rss_kb(pid) for pid in envoys.pids()]
                res.envoy_allocated_kb = [await envoys.allocated_kb(session, e)
                                          for e in envoys.processes]
                res.rds_bytes = len(first[types.ROUTE][ROUTE_CONFIG_NAME].body.value)
                res.cds_bytes = sum(len(r.body.value) for r in first[types.CLUSTER].values())
                res.eds_bytes = sum(len(r.body.value) for r in first[types.ENDPOINT].values())
                del first

                url = f"http://{LOOPBACK}:{listen_port}/"
                target = table[n // 2]
                body = await get_backend(session, url, target.host)
                if body != a.name:
                    raise RuntimeError(f"{target.host} answered {body!r} after sync, not A")

                # (b) endpoint flips ----------------------------------------------------
                await flips(res, session, url, target, table, builder, publisher, ads, a, b,
                            flip_count)
                res.stall_flip = monitor.take()
                res.envoy_rss_later_kb = [rss_kb(pid) for pid in envoys.pids()]

                # (c) add one service, staged -------------------------------------------
                await adds(res, session, url, table, builder, publisher, ads, a, push_log)
                res.stall_add = monitor.take()
        finally:
            if envoys is not None:
                await envoys.stop()
            if server is not None:
                await server.stop(grace=None)
    return res


async def get_backend(session: aiohttp.ClientSession, url: str, host: str) -> str:
    """GET through Envoy with this Host; the name of the backend that answered, or a note."""
    try:
        async with session.get(url, headers={"Host": host}) as r:
            text = await r.text()
            return text if r.status == 200 else f"HTTP {r.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"error {exc!r}"


def timed_update(builder: QuarantineBuilder, changed: dict[str, RoutedService | None],
                 into: list[float]) -> Callable[[], Desired]:
    """The control plane's build inside a publish: only the changed services are rebuilt
    (and checked), the config is handed out with the names it touched."""
    def build() -> Desired:
        started = time.perf_counter()
        builder.update(changed)
        out = builder.desired()
        into.append(time.perf_counter() - started)
        return out

    return build


async def flips(res: Result, session: aiohttp.ClientSession, url: str, target: RoutedService,
                table: list[RoutedService], builder: QuarantineBuilder, publisher: Publisher,
                ads: AdsServer, a: Backend, b: Backend, count: int) -> None:
    """Flip `target` between A and B `count` times while two clients poll it through
    Envoy."""
    latest: dict[str, float] = {}  # backend name -> perf_counter of its latest answer
    stop = asyncio.Event()
    index = table.index(target)

    async def poll() -> None:
        while not stop.is_set():
            name = await get_backend(session, url, target.host)
            latest[name] = time.perf_counter()
            if name not in (a.name, b.name):
                await asyncio.sleep(0.005)  # an error: do not spin

    pollers = [asyncio.create_task(poll()) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)  # traffic established before the first flip
        for flip in range(count):
            to = b if flip % 2 == 0 else a
            table[index] = flipped = dataclasses.replace(target, endpoints=(to.endpoint,))
            before = sent(ads)
            pushed = time.perf_counter()
            push = asyncio.create_task(publisher.publish(
                timed_update(builder, {flipped.name: flipped}, res.flip_build)))
            seen = None
            while seen is None and time.perf_counter() - pushed < FLIP_VISIBLE_DEADLINE:
                if latest.get(to.name, 0.0) >= pushed:
                    seen = latest[to.name] - pushed
                else:
                    await asyncio.sleep(0.0005)
            ok = await push
            acked = time.perf_counter() - pushed
            after = sent(ads)
            res.flip_sent.append((after[0] - before[0], after[1] - before[1]))
            if not ok:
                res.notes.append(f"flip {flip}: not every Envoy ACKed within {ACK_TIMEOUT}s")
            res.flip_ack.append(acked)
            if seen is None:
                res.flips_not_seen += 1
            else:
                res.flip_seen.append(seen)
            await asyncio.sleep(0.05)  # let the old target drain between flips
    finally:
        stop.set()
        await asyncio.gather(*pollers, return_exceptions=True)
    errors = [k for k in latest if k not in (a.name, b.name)]
    if errors:
        res.notes.append(f"pollers saw non-backend answers during flips: {errors[:3]}")


async def adds(res: Result, session: aiohttp.ClientSession, url: str,
               table: list[RoutedService], builder: QuarantineBuilder, publisher: Publisher,
               ads: AdsServer, a: Backend, push_log: PushLog) -> None:
    """Add one new service at a time (cluster + CLA first, then routes) and time each."""
    for k in range(ADDS):
        new = service(f"svc-new-{k}", a.endpoint)
        table.append(new)
        before = len(push_log.pushes)
        sent_before = sent(ads)
        pushed = time.perf_counter()
        ok = await publisher.publish(timed_update(builder, {new.name: new}, res.add_build))
        res.add_ack.append(time.perf_counter() - pushed)
        sent_after = sent(ads)
        res.add_sent.append((sent_after[0] - sent_before[0], sent_after[1] - sent_before[1]))
        res.add_stages.append([s for _, s in push_log.pushes[before:]])
        if not ok:
            res.notes.append(f"add {k}: not every Envoy ACKed within {ACK_TIMEOUT}s")
        body = await get_backend(session, url, new.host)
        if body != a.name:
            res.notes.append(f"add {k}: {new.host} answered {body!r} right after the ACK")


# --- the control plane alone -------------------------------------------------------------


async def control_plane_only(n: int, a: Backend, b: Backend,
                             routing: str = "virtual_hosts", flip_count: int = FLIPS) -> None:
    """The control plane's side of N services with no Envoy: the first build, its memory,
    and what one flip and one add cost it (build, stage deltas, the cache's new version,
    and encoding the delta response a stream would be sent)."""
    gc.collect()
    baseline = rss_kb()
    settings = GatewaySettings(listen=Endpoint(LOOPBACK, 10000), activators=(a.endpoint,),
                               routing=routing)
    builder = QuarantineBuilder(settings)
    cache = SnapshotCache()
    ads = AdsServer(cache)
    publisher = Publisher(cache, ads, ack_timeout=ACK_TIMEOUT)
    table = services(n, a.endpoint)
    started = time.perf_counter()
    publisher.load(Desired(builder.build(table)))
    build_s = time.perf_counter() - started
    gc.freeze()  # as the control plane does after its first load
    gc.collect()
    after = rss_kb()
    flips: list[float] = []
    encodes: list[float] = []
    target = table[n // 2]
    for flip in range(flip_count):
        to = b if flip % 2 == 0 else a
        shape = dataclasses.replace(target, endpoints=(to.endpoint,))
        started = time.perf_counter()
        await publisher.publish(timed_update(builder, {shape.name: shape}, []))
        snapshot = cache.snapshot()
        assert snapshot is not None and snapshot.changes is not None
        flips.append(time.perf_counter() - started)
        started = time.perf_counter()
        # a flip is the service's endpoints, or (host_header) its cluster that holds them
        flipped = types.ENDPOINT if types.ENDPOINT in snapshot.changes else types.CLUSTER
        changed = snapshot.changes[flipped].changed
        resources = snapshot.of_type(flipped)
        DeltaDiscoveryResponse(
            system_version_info=str(snapshot.version), type_url=flipped, nonce="1",
            resources=[ResourceMessage(name=name, version=resources[name].version,
                                       resource=resources[name].body)
                       for name in sorted(changed)]).SerializeToString()
        encodes.append(time.perf_counter() - started)
    adds: list[float] = []
    for k in range(ADDS):
        new = service(f"svc-new-{k}", a.endpoint)
        started = time.perf_counter()
        await publisher.publish(timed_update(builder, {new.name: new}, []))
        adds.append(time.perf_counter() - started)
    print(f"{n:>8} {ROUTING_SHORT[routing]:>7} {build_s:>8.2f} {mb(baseline):>8} {mb(after):>7} "
          f"{mb(after - baseline):>7} "
          f"{ms(med(flips)):>9} {ms(p99(flips)):>8} {ms(med(encodes)):>9} {ms(med(adds)):>8}",
          flush=True)


async def main_control_plane_only(sizes: list[int], routings: list[str],
                                  flip_count: int = FLIPS) -> int:
    print(f"xds_scale --control-plane-only: sizes {sizes}, no Envoy, {os.cpu_count()} CPUs")
    print(f"{'services':>8} {'routing':>7} {'build s':>8} {'RSS0 MB':>8} {'RSS MB':>7} "
          f"{'grew MB':>7} {'flip ms':>9} {'p99 ms':>8} {'encode ms':>9} {'add ms':>8}")
    a, b = Backend("A"), Backend("B")
    try:
        await a.start()
        await b.start()
        for n in sizes:
            for routing in routings:
                await control_plane_only(n, a, b, routing, flip_count)
    finally:
        await a.stop()
        await b.stop()
    print(f"(flip: the control plane's work for one endpoint flip, median and p99 of {flip_count}: "
          "rebuild and check the service, stage deltas, the cache's new version; encode: "
          "serializing the delta response a stream is sent; add: one new service, all stages, "
          f"median of {ADDS}; RSS after gc, this process)")
    return 0


# --- report -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p99(xs: list[float]) -> float:
    """The 99th percentile (nearest rank): with up to 100 samples, the largest."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered), max(1, math.ceil(0.99 * len(ordered)))) - 1]


def sent_bytes(sent_list: list[tuple[int, int]]) -> float:
    return med([float(b) for _, b in sent_list])


def per_push(sent_list: list[tuple[int, int]]) -> str:
    """Median resources and KB sent per push, e.g. "1 res 0.1 KB"."""
    if not sent_list:
        return "?"
    count = statistics.median(c for c, _ in sent_list)
    size = statistics.median(b for _, b in sent_list)
    return f"{count:.0f} res {size:.0f} B" if size < 10240 else \
        f"{count:.0f} res {size / 1024:.0f} KB"


def report(results: list[Result]) -> None:
    header = (f"{'services':>8} {'routing':>7} {'ADS':>5} {'sync s':>7} {'flip ack ms':>15} "
              f"{'flip seen ms':>15} {'sent per flip':>18} {'add ack ms':>11} "
              f"{'sent per add':>20} {'envoy MB':>9} {'RDS KB':>7}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        flip_ack = f"{ms(med(r.flip_ack))}/{ms(p99(r.flip_ack))}"
        flip_seen = (f"{ms(med(r.flip_seen))}/{ms(p99(r.flip_seen))}"
                     if r.flip_seen else "never")
        envoy = mb(max(r.envoy_rss_kb)) if r.envoy_rss_kb else "?"
        print(f"{r.size:>8} {ROUTING_SHORT[r.routing]:>7} {r.protocol:>5} {r.sync_s:>7.2f} "
              f"{flip_ack:>15} {flip_seen:>15} "
              f"{per_push(r.flip_sent):>18} {ms(med(r.add_ack)):>11} "
              f"{per_push(r.add_sent):>20} {envoy:>9} {r.rds_bytes / 1024:>7.0f}")
    print(f"(flip columns: median/p99 over {len(results[0].flip_ack)} flips; add: median over "
          f"{ADDS} adds; sent: "
          "resources and their serialized bytes the control plane sent, all Envoys together; "
          "envoy MB: the largest Envoy's VmRSS after the full sync)")
    for r in results:
        stages = [[round(s * 1000) for s in st] for st in r.add_stages]
        print(f"\n{r.size} services, {r.envoys} Envoy(s), {r.protocol}, routing {r.routing}:")
        print(f"  sync: all ACKed {r.acked_s:.2f} s, ACKed+ready {r.sync_s:.2f} s = first build "
              f"{r.build_s:.2f} s + Envoy spawned -> synced {r.envoy_sync_s:.2f} s; "
              f"{r.sync_bytes / 1024 / 1024:.1f} MB sent; worst loop stall "
              f"{ms(r.stall_sync)} ms")
        print(f"  flip: ack max {ms(max(r.flip_ack))} ms; builder inside publish median "
              f"{ms(med(r.flip_build))} ms; worst loop stall {ms(r.stall_flip)} ms; not seen "
              f"within {FLIP_VISIBLE_DEADLINE:.0f} s: {r.flips_not_seen}")
        print(f"  add:  per-stage push ms (CDS+EDS, RDS) {stages}; sent {r.add_sent}; builder "
              f"median {ms(med(r.add_build))} ms; worst loop stall {ms(r.stall_add)} ms")
        print(f"  sizes: RDS {r.rds_bytes / 1024:.0f} KB, all clusters {r.cds_bytes / 1024:.0f} KB"
              f", all CLAs {r.eds_bytes / 1024:.0f} KB; control plane RSS "
              f"{mb(r.cp_baseline_kb)} -> {mb(r.cp_rss_kb)} MB; Envoy RSS MB "
              f"{[round(k / 1024) for k in r.envoy_rss_kb]}")
        print(f"  Envoy memory: heap allocated after sync (admin /memory) MB "
              f"{[round(k / 1024) for k in r.envoy_allocated_kb]}; RSS after the flips MB "
              f"{[round(k / 1024) for k in r.envoy_rss_later_kb]}; load average (1 min) at "
              f"the sync {r.load_average}")
        for note in r.notes:
            print(f"  NOTE: {note}")

    def ratio(x: float, y: float) -> str:
        return f"x{y / x:.1f}" if x > 0 else "n/a"

    by_key = {(r.size, r.protocol, r.routing): r for r in results}
    for size, routing in sorted({(r.size, r.routing) for r in results}):
        delta = by_key.get((size, "delta", routing))
        sotw = by_key.get((size, "sotw", routing))
        if delta is None or sotw is None:
            continue
        print(f"\nsotw vs delta at {size} services, {routing} (sotw / delta): "
              f"flip ack {ratio(med(delta.flip_ack), med(sotw.flip_ack))}, "
              f"flip seen {ratio(med(delta.flip_seen), med(sotw.flip_seen))}, "
              f"bytes per flip {ratio(sent_bytes(delta.flip_sent), sent_bytes(sotw.flip_sent))}, "
              f"add ack {ratio(med(delta.add_ack), med(sotw.add_ack))}, "
              f"bytes per add {ratio(sent_bytes(delta.add_sent), sent_bytes(sotw.add_sent))}, "
              f"sync {ratio(delta.sync_s, sotw.sync_s)}")


def report_spread(results: list[Result]) -> None:
    """Each figure's median and worst over the runs of one size, routing and protocol:
    on a shared machine one run's wall-clock figures move with what else runs."""
    groups: dict[tuple[int, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.size, r.routing, r.protocol), []).append(r)
    header = (f"{'services':>8} {'routing':>7} {'ADS':>5} {'runs':>4} {'sync s':>11} "
              f"{'envoy part s':>12} {'flip ack p99 ms':>15} {'add ack ms':>10} "
              f"{'envoy MB':>9}")
    print(f"\nover the runs (median / worst):\n{header}\n{'-' * len(header)}")
    for (size, routing, protocol), runs in groups.items():
        def spread(values: list[float], fmt: str = ".2f") -> str:
            return f"{med(values):{fmt}}/{max(values):{fmt}}"

        print(f"{size:>8} {ROUTING_SHORT[routing]:>7} {protocol:>5} {len(runs):>4} "
              f"{spread([r.sync_s for r in runs]):>11} "
              f"{spread([r.envoy_sync_s for r in runs]):>12} "
              f"{spread([p99(r.flip_ack) * 1000 for r in runs], '.1f'):>15} "
              f"{spread([med(r.add_ack) * 1000 for r in runs], '.1f'):>10} "
              f"{spread([max(r.envoy_rss_kb) / 1024 for r in runs], '.0f'):>9}")


async def main(sizes: list[int], envoy_count: int, protocols: list[str],
               routings: list[str], flip_count: int = FLIPS, repeat: int = 1) -> int:
    print(f"xds_scale: sizes {sizes}, protocols {protocols}, routing {routings}, "
          f"{envoy_count} Envoy(s) "
          f"--concurrency 2, {os.cpu_count()} CPUs, pid {os.getpid()}", flush=True)
    monitor = LoopMonitor()
    monitor.start()
    a, b = Backend("A"), Backend("B")
    results: list[Result] = []
    try:
        await a.start()
        await b.start()
        for n in sizes:
            for routing in routings:
                for protocol in protocols:
                    for run in range(repeat):
                        began = time.perf_counter()
                        print(f"  {n} services, {routing}, {protocol}, run {run + 1} ...",
                              end="", flush=True)
                        results.append(await run_size(n, envoy_count, protocol, a, b,
                                                      monitor, routing, flip_count))
                        print(f" done in {time.perf_counter() - began:.1f} s", flush=True)
    finally:
        await a.stop()
        await b.stop()
        await monitor.stop()
    report(results)
    if repeat > 1:
        report_spread(results)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000",
                        help="comma-separated service counts (default 1000,10000)")
    parser.add_argument("--envoys", type=int, default=1, help="Envoys per size (default 1)")
    parser.add_argument("--protocols", default="delta,sotw",
                        help="comma-separated ADS variants (default delta,sotw)")
    parser.add_argument("--routing", default=",".join(ROUTING_MODES),
                        help="comma-separated gateway.routing modes (default: both)")
    parser.add_argument("--flips", type=int, default=FLIPS,
                        help=f"endpoint flips per run (default {FLIPS})")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each size, routing and protocol, one after the other; "
                             "with more than one, a last table gives each figure's median "
                             "and worst over the runs (default 1)")
    parser.add_argument("--control-plane-only", action="store_true",
                        help="no Envoy: the control plane's build, memory and per-flip work "
                             "at each size (e.g. --sizes 10000,50000)")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) < 1 or min(args.envoys, args.flips, args.repeat) < 1:
        parser.error("sizes, --envoys, --flips and --repeat must be positive")
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocols or not set(args.protocols) <= set(XDS_PROTOCOLS):
        parser.error(f"protocols are among {', '.join(XDS_PROTOCOLS)}")
    args.routing = [r.strip() for r in args.routing.split(",") if r.strip()]
    if not args.routing or not set(args.routing) <= set(ROUTING_MODES):
        parser.error(f"routing modes are among {', '.join(ROUTING_MODES)}")
    return args


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    if options.control_plane_only:
        sys.exit(asyncio.run(main_control_plane_only(options.sizes, options.routing,
                                                     options.flips)))
    sys.exit(asyncio.run(main(options.sizes, options.envoys, options.protocols,
                              options.routing, options.flips, options.repeat)))
