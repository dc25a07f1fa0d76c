"""Fleet mode on etcd: what the lease lock, a state change through etcd, and extra
activator replicas cost, each against a baseline measured in the same run.

    python bench/fleet.py [--rounds 30] [--lock-rounds 200] [--wakes 8] [--burst 50]
    python bench/fleet.py --quick            # smoke run: few rounds of everything
    python bench/fleet.py --parts 1,2        # only some parts

It starts real etcd servers (tests/support/etcd.py) in a temp dir, only on 127.0.0.1, and
prints:
  1. the etcd lock (torpor/locks/etcd.py EtcdLocks over torpor/etcd/session.py EtcdSession
     over torpor/etcd/connection.py EtcdConnection): uncontended acquire, release, and the
     hand-off from a holder's release until a waiter on another connection (another
     gRPC channel, as another process would have) holds it; p50/p90/p99/max, against one
     etcd round trip (a Range get) on the same connection;
  2. a state change reaching Envoy through etcd: an in-process ControlPlane (its own
     EtcdStore and connection, FixedWorkloads) programs a real Envoy; a record is moved
     ACTIVE -> HIBERNATING with torpor.lifecycle.records.change_state through a second
     EtcdStore on its own connection (the writer stands for another process: its write
     reaches the control plane only through etcd's watch), and the time runs until the
     control plane's ADS server has Envoy's ACK of the resulting EDS change (the service's
     endpoints switch to the activator's address). Baseline: the same flip written through
     the control plane's own store (its put tells the table as soon as etcd answers; the
     control plane's watch may bring the same event first);
  3. waking a hibernated Kubernetes service (fake API server probing pods every 20 ms,
     real pod processes, load 0 s) with a burst of concurrent requests through a real
     Envoy, on a fleet of `torpor xds-server` x2 + `torpor activator` x3, and on one with
     a single activator (tests/support/fleet.py, both fleets up at once, rounds
     alternating between them): time to the first and to the last 200, and scale-up calls
     per wake (must be 1).
At the end: VmRSS of every process of the fleets.

The fleets run with a 10 s lease TTL instead of the harness's 2 s: on a loaded 2-core
machine a starting activator can block its event loop for more than 2 s after its lease
was granted (Kubernetes workloads start before the keep-alive runs); the lease expires,
and the activator's registration, racing the re-grant, can be lost for good (it then
never appears in Envoy's activator cluster and Fleet.start times out).

A benchmark prints figures; it never passes or fails on time. Every process it starts is
stopped in finally blocks, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed with torpor

import aiohttp  # noqa: E402

from tests.support.configs import model_service as local_service_yaml  # noqa: E402
from tests.support.envoy import Envoy  # noqa: E402
from tests.support.etcd import EtcdServer  # noqa: E402
from tests.support.fake_kube import FakeKube  # noqa: E402
from tests.support.fleet import NS, Fleet  # noqa: E402
from tests.support.kube_objects import (  # noqa: E402
    kube_service_yaml,
    model_deployment,
    model_service,
)
from tests.support.net import free_port, wait_until  # noqa: E402
from tests.support.workloads import FixedWorkloads  # noqa: E402
from torpor import admin_client  # noqa: E402
from torpor.config import load_config  # noqa: E402
from torpor.credentials import admin_target  # noqa: E402
from torpor.etcd.connection import EtcdConnection  # noqa: E402
from torpor.etcd.session import EtcdSession  # noqa: E402
from torpor.lifecycle.records import change_state  # noqa: E402
from torpor.locks.etcd import EtcdLocks  # noqa: E402
from torpor.model import Endpoint, ServiceState  # noqa: E402
from torpor.store.etcd import EtcdStore  # noqa: E402
from xds_server import types  # noqa: E402
from xds_server.control_plane import ControlPlane  # noqa: E402

LOOPBACK = "127.0.0.1"
FLIP_SERVICE = "flip"
STATE_TIMEOUT = 30.0  # s: a service reaching a state / Envoy showing it
ACK_TIMEOUT = 10.0  # s: a flip reaching every Envoy
BURST_TIMEOUT = 90.0  # s: a request of a wake burst
PROBE_PERIOD = 0.02  # s: the fake kubelet's readiness probe interval

#: Last-resort kills for what this run started (each one does nothing when already stopped).
LEFTOVERS: list[Callable[[], None]] = []


# --- statistics and printing --------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (with fewer than 100 values, p99 is the maximum)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.0f}" if value >= 99.95 else f"{value:.2f}" if value < 9.995 else f"{value:.1f}"


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b > 0 and not math.isnan(a) else "-"


def table(title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float]]],
          label_width: int = 66) -> None:
    """Rows of (label, seconds); each column a percentile name ("p50", "max")."""
    print(f"{title:<{label_width}}" + "".join(f"{c:>9}" for c in columns))
    for label, values in rows:
        cells = []
        for c in columns:
            p = 100.0 if c == "max" else float(c[1:])
            cells.append(ms(pct(values, p)))
        print(f"  {label:<{label_width - 2}}" + "".join(f"{x:>9}" for x in cells))


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def start_etcd(workdir: Path, stack: contextlib.AsyncExitStack) -> EtcdServer:
    etcd = EtcdServer(workdir)
    LEFTOVERS.append(etcd.kill)
    stack.push_async_callback(asyncio.to_thread, etcd.stop)
    etcd.start()
    await etcd.wait_ready()
    return etcd


async def open_conn(endpoint: str, prefix: str,
                    stack: contextlib.AsyncExitStack) -> EtcdConnection:
    conn = EtcdConnection([endpoint], prefix=prefix, timeout=5.0)
    await conn.open()
    stack.push_async_callback(conn.close)
    return conn


# --- 1. the etcd lock ---------------------------------------------------------------------


async def bench_locks(etcd: EtcdServer, rounds: int) -> None:
    print(f"\n1. etcd lock: torpor/locks/etcd.py EtcdLocks over EtcdSession over "
          f"EtcdConnection, {rounds} rounds")
    async with contextlib.AsyncExitStack() as stack:
        conn_a = await open_conn(etcd.endpoint, "/bench-locks/", stack)
        conn_b = await open_conn(etcd.endpoint, "/bench-locks/", stack)
        sessions = [EtcdSession(conn_a, 10, "bench-a"), EtcdSession(conn_b, 10, "bench-b")]
        for session in sessions:
            stack.push_async_callback(session.close)
            await session.lease_id()  # granted before measuring: a process keeps its lease
        locks = [EtcdLocks(s) for s in sessions]
        for lock in locks:
            stack.push_async_callback(lock.close)
        name = "wake/bench"
        probe_key = conn_a.key("locks", name)

        for _ in range(10):  # warm-up: channels, stubs, etcd's caches
            await conn_a.get(probe_key)
            async with locks[0].hold(name, 5):
                pass

        rtt: list[float] = []
        acquire: list[float] = []
        release: list[float] = []
        both: list[float] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await conn_a.get(probe_key)
            rtt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async with locks[0].hold(name, 5):
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            acquire.append(t1 - t0)
            release.append(t2 - t1)
            both.append(t2 - t0)

        handoff: list[float] = []
        handoff_release: list[float] = []
        for i in range(rounds):
            holder, waiter = (locks[0], locks[1]) if i % 2 == 0 else (locks[1], locks[0])
            got = asyncio.get_running_loop().create_future()

            async def wait_for_it(waiter: EtcdLocks = waiter,
                                  got: asyncio.Future[float] = got) -> None:
                async with waiter.hold(name, 10):
                    got.set_result(time.perf_counter())

            async with holder.hold(name, 5):
                task = asyncio.create_task(wait_for_it())
                # The waiter's create fails and it opens its watch within ~2 ms on
                # loopback; a delete before the watch exists is still seen (it watches
                # from the revision after the failed create).
                await asyncio.sleep(0.03)
                if got.done():
                    raise RuntimeError("the waiter got the lock while it was held")
                released_at = time.perf_counter()
            released = time.perf_counter()
            held_at = await asyncio.wait_for(got, 10)
            await task
            handoff.append(held_at - released_at)
            handoff_release.append(released - released_at)

    columns = ("p50", "p90", "p99", "max")
    table("  ms", columns, [
        ("etcd round trip (Range get of the lock key, same connection)", rtt),
        ("uncontended acquire (one create-if-absent txn)", acquire),
        ("uncontended release (one delete-if-ours txn)", release),
        ("uncontended acquire + release", both),
        ("hand-off: holder starts release -> waiter (other conn.) holds it", handoff),
        ("  ... of it: holder's release returned", handoff_release),
    ])
    r50 = pct(rtt, 50)
    print(f"  ratio acquire / round trip (p50): {ratio(pct(acquire, 50), r50)}; "
          f"acquire+release / round trip: {ratio(pct(both, 50), r50)}; "
          f"hand-off / round trip: {ratio(pct(handoff, 50), r50)}")
    print("  (both sessions live in this process, each on its own connection = gRPC channel; "
          "the hand-off is the delete txn, the watch event to the waiter, and its create txn)")


# --- 2. state change -> Envoy applied, through etcd vs local -------------------------------


def flip_config(tmp: Path, etcd: EtcdServer) -> Path:
    p = {k: free_port() for k in ("listen", "admin", "xds", "api", "metrics", "act", "actm",
                                  "acth2")}
    text = f"""
gateway: {{listen: {LOOPBACK}:{p['listen']}, admin: {LOOPBACK}:{p['admin']}}}
control_plane: {{xds: {LOOPBACK}:{p['xds']}, admin_api: {LOOPBACK}:{p['api']},
                metrics: {LOOPBACK}:{p['metrics']}, ack_timeout: 10s}}
activator: {{listen: {LOOPBACK}:{p['act']}, metrics: {LOOPBACK}:{p['actm']},
            listen_h2: {LOOPBACK}:{p['acth2']}, wake_timeout: 30s}}
store: {{kind: etcd, endpoints: ["{etcd.endpoint}"], prefix: /bench-flip/, member: cp}}
workloads: {{kind: local}}
policy: {{kind: fixed, idle_after: 24h, evict_after: 48h}}
services:
{local_service_yaml(FLIP_SERVICE, 1)}"""
    path = tmp / "flip.yaml"
    path.write_text(text)
    return path


async def envoy_endpoints(envoy: Envoy, cluster: str) -> set[str]:
    return (await envoy.cluster_hosts()).get(cluster, set())


async def bench_flip(etcd: EtcdServer, tmp: Path, rounds: int) -> None:
    print(f"\n2. state change -> Envoy applied (in-process ControlPlane on its own EtcdStore, "
          f"FixedWorkloads, 1 real Envoy), {rounds} rounds")
    config = load_config(flip_config(tmp, etcd))
    replica = Endpoint(LOOPBACK, free_port())  # Envoy does not health-check: nothing listens
    activator = f"{LOOPBACK}:{config.activator.listen.port}"
    async with contextlib.AsyncExitStack() as stack:
        cp_conn = EtcdConnection([etcd.endpoint], "/bench-flip/", 5.0)
        stack.push_async_callback(cp_conn.close)  # after the control plane's stop
        cp_store = EtcdStore(cp_conn, "cp")
        await cp_store.open()  # opened and closed here, as an assembly would
        stack.push_async_callback(cp_store.close)
        cp = ControlPlane(config, cp_store, FixedWorkloads(
            {FLIP_SERVICE: (replica,)}), serve_metrics=False, run_policy=False)
        stack.push_async_callback(_stop_control_plane, cp)
        await cp.start()
        writer_conn = await open_conn(etcd.endpoint, "/bench-flip/", stack)
        writer = EtcdStore(writer_conn, "writer")  # never opened: no watch of its own
        assert cp.ports is not None
        envoy = Envoy(tmp, "flip-envoy", config.gateway.admin.port, cp.ports.xds)
        LEFTOVERS.append(envoy.stop)
        stack.push_async_callback(asyncio.to_thread, envoy.stop)
        envoy.start()
        await envoy.wait_ready()
        await wait_until(lambda: len(cp.ads.streams()) == 1, STATE_TIMEOUT, "Envoy's ADS stream")
        await wait_until(lambda: _envoy_shows(envoy, {str(replica)}), STATE_TIMEOUT,
                         "Envoy routing the service to its replica")

        async def flip(store: EtcdStore, to: ServiceState) -> tuple[float, float, float]:
            """(put returned, snapshot built, every Envoy ACKed), seconds from the write."""
            current = await store.get(FLIP_SERVICE)
            assert current is not None
            snapshot = cp.cache.snapshot()
            assert snapshot is not None
            before = snapshot.resources[types.ENDPOINT][FLIP_SERVICE].digest
            built: asyncio.Future[tuple[int, float]] = \
                asyncio.get_running_loop().create_future()

            def watcher(snap: Any) -> None:
                cla = snap.resources.get(types.ENDPOINT, {}).get(FLIP_SERVICE)
                if cla is not None and cla.digest != before and not built.done():
                    built.set_result((snap.version, time.perf_counter()))

            cancel = cp.cache.create_watch(watcher)
            try:
                t0 = time.perf_counter()
                await change_state(store, current, to, "bench", time.time())
                t_put = time.perf_counter()
                version, t_built = await asyncio.wait_for(built, ACK_TIMEOUT)
                lagging = await cp.ads.wait_synced(version, ACK_TIMEOUT)
                t_acked = time.perf_counter()
            finally:
                cancel()
            if lagging:
                raise RuntimeError(f"Envoy did not apply version {version}: {lagging}")
            return t_put - t0, t_built - t0, t_acked - t0

        for _ in range(3):  # warm-up, both paths
            for store in (writer, cp.store):
                await flip(store, ServiceState.HIBERNATING)
                await flip(store, ServiceState.ACTIVE)

        results: dict[str, list[tuple[float, float, float]]] = {"remote": [], "local": []}
        for i in range(rounds):
            order = ("remote", "local") if i % 2 == 0 else ("local", "remote")
            for path in order:
                store = writer if path == "remote" else cp.store
                assert isinstance(store, EtcdStore)
                results[path].append(await flip(store, ServiceState.HIBERNATING))
                if not await _envoy_shows(envoy, {activator}):  # ACKed means applied
                    raise RuntimeError("Envoy ACKed but does not show the activator endpoint")
                await flip(store, ServiceState.ACTIVE)

    def col(path: str, i: int) -> list[float]:
        return [r[i] for r in results[path]]

    columns = ("p50", "p90", "max")
    table("  ms from the write (ACTIVE -> HIBERNATING)", columns, [
        ("other connection (through etcd's watch): put returned", col("remote", 0)),
        ("  control plane built the snapshot with the new endpoints", col("remote", 1)),
        ("  Envoy ACKed the EDS update (applied)", col("remote", 2)),
        ("control plane's own store (local, baseline): put returned", col("local", 0)),
        ("  control plane built the snapshot with the new endpoints", col("local", 1)),
        ("  Envoy ACKed the EDS update (applied)", col("local", 2)),
    ])
    remote, local = pct(col("remote", 2), 50), pct(col("local", 2), 50)
    top = ratio(pct(col("remote", 2), 100), pct(col("local", 2), 100))
    print(f"  ratio applied through etcd / local (p50): {ratio(remote, local)} "
          f"({(remote - local) * 1000:+.2f} ms); max: {top}")
    print("  'applied' = the control plane's ADS ack tracking (AdsServer.wait_synced: Envoy's "
          "ACK of the version carrying the change, event-driven, no polling); after each "
          "measured flip, Envoy's /clusters was checked to list the activator. The writer "
          "runs in this process on its own EtcdConnection (own gRPC channel); the control "
          "plane learns of its write only through its etcd watch. In the local path the "
          "control plane takes whichever comes first: etcd's answer to its own put, or the "
          "watch event on the same connection (etcd sends both at the commit), so both paths "
          "wait for one etcd commit. 'built' before 'put returned' means the watch event "
          "was there first. Rounds alternate the order of the two paths.")


async def _stop_control_plane(cp: ControlPlane) -> None:
    try:
        await cp.stop()
    except Exception as exc:  # e.g. a start that failed half-way: still close the rest
        print(f"warning: stopping the control plane: {exc!r}", file=sys.stderr)


async def _envoy_shows(envoy: Envoy, endpoints: set[str]) -> bool:
    try:
        return await envoy_endpoints(envoy, FLIP_SERVICE) == endpoints
    except aiohttp.ClientError:
        return False


# --- 3. waking with 3 activators vs 1 ------------------------------------------------------


class FleetUnderTest:
    def __init__(self, activators: int, fleet: Fleet, service: str) -> None:
        self.activators = activators
        self.fleet = fleet
        self.service = service
        self.reset()

    def reset(self) -> None:
        """Forget the figures (after the warm-up wake)."""
        self.first: list[float] = []
        self.last: list[float] = []
        self.header: list[float] = []
        self.scale_ups: list[int] = []
        self.not_ok: list[str] = []
        self.held: dict[str, float] = {}

    @property
    def label(self) -> str:
        return f"{self.activators} activator{'s' if self.activators > 1 else ''}"


def pods_of(kube: FakeKube, service: str) -> list[str]:
    return [p for p in kube.pod_processes(NS) if p.startswith(f"{service}-")]


async def hibernate(fut: FleetUnderTest) -> None:
    """`torpor hibernate` through the first control plane's admin API, then until Envoy
    sends the service to every activator and no pod process is left (tests/fleet)."""
    fleet, name = fut.fleet, fut.service
    await fleet.wait_state(name, "ACTIVE", STATE_TIMEOUT)
    await wait_until(lambda: _pod_endpoints(fleet, name), STATE_TIMEOUT,
                     f"Envoy's {name} endpoints back on its pod")
    api = admin_target(load_config(fleet.cp_configs[0]))
    await asyncio.to_thread(admin_client.hibernate, api, name, 60)
    await fleet.wait_state(name, "HIBERNATED", STATE_TIMEOUT)
    await wait_until(lambda: _activator_endpoints(fleet, name), STATE_TIMEOUT,
                     f"Envoy's {name} endpoints = every activator")
    await wait_until(lambda: not pods_of(fleet.kube, name), STATE_TIMEOUT,
                     f"no {name} pod process left")


async def _activator_endpoints(fleet: Fleet, name: str) -> bool:
    return await fleet.envoy_endpoints(name) == fleet.activator_addresses()


async def _pod_endpoints(fleet: Fleet, name: str) -> bool:
    found = await fleet.envoy_endpoints(name)
    return bool(found) and not found & fleet.activator_addresses()


async def burst(fut: FleetUnderTest, k: int) -> None:
    """K concurrent GETs to the sleeping service through the fleet's Envoy."""
    fleet, name = fut.fleet, fut.service
    before = fleet.kube.count("patch", "deployments", "scale", name)
    held_before = await fleet.held_by_activator(name)
    url = f"http://{LOOPBACK}:{fleet.listen}/predict?text=hi"
    headers = {"Host": f"{name}.localhost"}
    done: list[tuple[int, float, str | None]] = []

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(url, headers=headers) as response:
                await response.read()
                done.append((response.status, time.perf_counter(),
                             response.headers.get("x-torpor-cold-start-ms")))
        except (aiohttp.ClientError, TimeoutError) as exc:
            done.append((-1, time.perf_counter(), type(exc).__name__))

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=BURST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(k)))
    ok = [t - t0 for status, t, _ in done if status == 200]
    if ok:
        fut.first.append(min(ok))
        fut.last.append(max(ok))
    bad = [f"{status}" if status > 0 else f"{h}" for status, _, h in done if status != 200]
    if bad:
        fut.not_ok.append(f"{len(bad)} of {k} not 200: {sorted(set(bad))}")
    headers_ms = [float(h) for status, _, h in done if status == 200 and h]
    if headers_ms:
        fut.header.append(max(headers_ms) / 1000)
    fut.scale_ups.append(fleet.kube.count("patch", "deployments", "scale", name) - before)
    for member, count in (await fleet.held_by_activator(name)).items():
        fut.held[member] = fut.held.get(member, 0) + count - held_before.get(member, 0)


async def bench_wake(tmp: Path, wakes: int, k: int, stack: contextlib.AsyncExitStack
                     ) -> list[FleetUnderTest]:
    print(f"\n3. wake with 3 activators vs 1 (Fleet harness: 2 `torpor xds-server` + N "
          f"`torpor activator` processes, each fleet on its own etcd, fake Kubernetes API, "
          f"1 real Envoy per fleet), {wakes} wakes each, {k} concurrent requests per wake")
    # The fake kubelet probes each pod every PROBE_PERIOD (its default, 0.1 s, puts every
    # cold start on a 100 ms step, which hides what the activators add).
    kube = FakeKube(probe_period=PROBE_PERIOD)
    LEFTOVERS.append(kube.cluster.kubelet.kill_all)
    stack.callback(kube.stop)
    await asyncio.to_thread(kube.start)
    fleets: list[FleetUnderTest] = []
    for activators in (3, 1):
        name = f"wake{activators}"
        kube.create(model_deployment(name, NS, replicas=1, load_seconds=0))
        kube.create(model_service(name, NS))
        await wait_until(lambda name=name: len(pods_of(kube, name)) == 1, STATE_TIMEOUT,
                         f"{name}'s pod")
        workdir = tmp / f"fleet-{activators}"
        workdir.mkdir()
        etcd = await start_etcd(workdir / "etcd", stack)
        fleet = await start_fleet(workdir, etcd, kube, name, activators)
        stack.push_async_callback(_stop_fleet, fleet)
        fleets.append(FleetUnderTest(activators, fleet, name))
    for fut in fleets:  # a first wake each, not counted: imports, connections, caches
        await hibernate(fut)
        await burst(fut, k)
    for fut in fleets:
        fut.reset()
    for i in range(wakes):
        for fut in (fleets if i % 2 == 0 else fleets[::-1]):
            await hibernate(fut)
            await burst(fut, k)
        print(f"  wake {i + 1}/{wakes}: " + "; ".join(
            f"{f.label} first {ms(f.first[-1]) if f.first else '-'} ms, "
            f"last {ms(f.last[-1]) if f.last else '-'} ms, scale-ups {f.scale_ups[-1]}"
            for f in fleets), flush=True)

    columns = ("p50", "max")
    rows: list[tuple[str, Sequence[float]]] = []
    for fut in fleets:
        rows += [(f"{fut.label}: burst sent -> first 200", fut.first),
                 (f"{fut.label}: burst sent -> last 200", fut.last),
                 (f"{fut.label}: x-torpor-cold-start-ms (largest per wake)", fut.header)]
    table("  ms", columns, rows)
    three, one = fleets
    print("  ratio 3 activators / 1: "
          f"first 200 p50 {ratio(pct(three.first, 50), pct(one.first, 50))}, "
          f"max {ratio(pct(three.first, 100), pct(one.first, 100))}; "
          f"last 200 p50 {ratio(pct(three.last, 50), pct(one.last, 50))}, "
          f"max {ratio(pct(three.last, 100), pct(one.last, 100))}")
    for fut in fleets:
        held = ", ".join(f"{m} {v:.0f}" for m, v in sorted(fut.held.items()))
        print(f"  {fut.label}: scale-up calls per wake {fut.scale_ups} (must be 1 each); "
              f"requests held per activator over {wakes} wakes: {held}")
        for problem in fut.not_ok:
            print(f"  {fut.label}: {problem}")
    print(f"  Pods load in 0 s; the time includes the fake kubelet starting a Python process "
          f"(~0.2 s) and its readiness probe (every {PROBE_PERIOD * 1000:.0f} ms), so compare "
          f"the two configurations, not the absolute figures. Rounds alternate which fleet "
          f"goes first; the idle fleet keeps running meanwhile.")
    return fleets


async def start_fleet(workdir: Path, etcd: EtcdServer, kube: FakeKube, name: str,
                      activators: int, attempts: int = 3) -> Fleet:
    """A started Fleet. The harness picks its ports before its processes start, so one
    may be taken meanwhile (any process's outgoing connection can get it): then the
    fleet is stopped and made again with new ports."""
    for attempt in range(1, attempts + 1):
        # lease_ttl 10 s, not the harness's 2 s: see the module docstring.
        fleet = Fleet(workdir, etcd, kube, kube_service_yaml(name, NS, replicas=1),
                      control_planes=2, activators=activators, lease_ttl="10s")
        LEFTOVERS.append(lambda fleet=fleet: _kill_fleet(fleet))
        try:
            await fleet.start()
            return fleet
        except BaseException as exc:
            retry = (isinstance(exc, AssertionError) and attempt < attempts
                     and "already in use" in str(exc).lower())
            if isinstance(exc, AssertionError) and not retry:
                _print_problems(fleet)
            await fleet.stop()
            if not retry:
                raise
            print(f"  (fleet with {activators} activator(s): a port it picked was taken "
                  f"meanwhile; starting it again on new ports)", flush=True)
    raise AssertionError("unreachable")


def _print_problems(fleet: Fleet) -> None:
    """Warnings and errors the fleet's processes logged (when it failed to start)."""
    for proc in [*fleet.control_planes, *fleet.activators]:
        for line in proc.text().splitlines():
            if '"level": "warning"' in line or '"level": "error"' in line \
                    or "Traceback" in line:
                print(f"  {proc.name}: {line[:300]}", file=sys.stderr)


async def _stop_fleet(fleet: Fleet) -> None:
    problems = await fleet.stop()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return  # interrupted: a process still starting dies of SIGTERM, as it should
    for problem in problems:
        head, _, log = problem.partition("\n")
        print(f"warning: fleet process did not stop cleanly: {head}\n{log[-600:]}",
              file=sys.stderr)


def _kill_fleet(fleet: Fleet) -> None:
    if fleet.envoy is not None:
        fleet.envoy.stop()
    for proc in [*fleet.activators, *fleet.control_planes]:
        proc.kill()


def print_rss(fleets: list[FleetUnderTest]) -> None:
    print("\nVmRSS at the end (MB):")
    for fut in fleets:
        fleet = fut.fleet
        cells = []
        for proc in [*fleet.control_planes, *fleet.activators]:
            kb = rss_kb(proc.proc.pid if proc.proc is not None and proc.alive else None)
            cells.append(f"{proc.name} {kb / 1024:.0f}" if kb else f"{proc.name} -")
        envoy_kb = rss_kb(fleet.envoy.proc.pid if fleet.envoy and fleet.envoy.proc else None)
        etcd_kb = rss_kb(fleet.etcd.proc.pid if fleet.etcd.proc else None)
        cells.append(f"envoy {envoy_kb / 1024:.0f}" if envoy_kb else "envoy -")
        cells.append(f"etcd {etcd_kb / 1024:.0f}" if etcd_kb else "etcd -")
        print(f"  fleet with {fut.label}: " + ", ".join(cells))
    me = rss_kb(os.getpid())
    print(f"  this bench process (part 2's control plane, the fake API server, clients): "
          f"{(me or 0) / 1024:.0f}")


# --- main ---------------------------------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count()
    load = os.getloadavg()[0]
    try:
        out = subprocess.run([_envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        found = re.search(r"/(\d+\.\d+\.\d+)/", out)
        envoy = found[1] if found else "?"
    except (OSError, subprocess.SubprocessError):
        envoy = "?"
    return (f"{cpus} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            f"Envoy {envoy}, load average (1 min) {load:.2f}")


def _envoy_binary() -> str:
    from torpor.gateway import envoy_binary
    return envoy_binary()


async def run(args: argparse.Namespace) -> int:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    print(f"fleet bench: {machine()}")
    print(f"parts {','.join(map(str, sorted(args.parts)))}; lock rounds {args.lock_rounds}, "
          f"flip rounds {args.rounds}, wakes {args.wakes} x {args.burst} requests")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-fleet-"))
    if args.keep:
        print(f"keeping logs and configs in {tmp}")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if args.parts & {1, 2}:
                etcd = await start_etcd(tmp / "etcd", stack)
                if 1 in args.parts:
                    await bench_locks(etcd, args.lock_rounds)
                if 2 in args.parts:
                    await bench_flip(etcd, tmp, args.rounds)
            if 3 in args.parts:
                fleets = await bench_wake(tmp, args.wakes, args.burst, stack)
                print_rss(fleets)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndone in {time.monotonic() - started:.0f} s; load average (1 min) now "
          f"{os.getloadavg()[0]:.2f}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="part 2: flips per path (default 30)")
    parser.add_argument("--lock-rounds", type=int,
                        help="part 1: acquires and hand-offs (default 200)")
    parser.add_argument("--wakes", type=int, help="part 3: wakes per fleet (default 8)")
    parser.add_argument("--burst", type=int, default=50,
                        help="part 3: concurrent requests per wake (default 50)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (process logs, configs) afterwards")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 30)
    args.lock_rounds = args.lock_rounds if args.lock_rounds is not None else (
        20 if args.quick else 200)
    args.wakes = args.wakes if args.wakes is not None else (2 if args.quick else 8)
    try:
        args.parts = {int(p) for p in args.parts.split(",") if p.strip()}
    except ValueError:
        parser.error("--parts takes numbers among 1,2,3")
    if not args.parts <= {1, 2, 3} or not args.parts:
        parser.error("--parts takes numbers among 1,2,3")
    if min(args.rounds, args.lock_rounds, args.wakes, args.burst) < 1:
        parser.error("counts must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nfleet: interrupted", file=sys.stderr)
        return 130
    finally:
        for kill in reversed(LEFTOVERS):  # normally stopped already by the finally blocks
            with contextlib.suppress(Exception):
                kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
