"""A fleet on one machine, for fleet-mode tests: a real etcd, the fake Kubernetes API,
N `torpor xds-server` and M `torpor activator` processes (each with its own config file:
its own ports and folder of asynchronous calls, the same etcd and services), and one real
Envoy whose xDS cluster lists every control plane. Every process is stopped by `stop()`,
even after a failed test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.envoy import Envoy, stop_envoy
from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.net import free_port, wait_until

NS = "models"


class Proc:
    """One torpor process with its output in a file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, like a crash or an OOM kill: no clean-up runs."""
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; returns the exit code (None: was not started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


class Fleet:
    """Control planes cp0.., activators a0.., and one Envoy, on etcd and the fake API."""

    def __init__(self, tmp: Path, etcd: EtcdServer, kube: FakeKube, services: str, *,
                 control_planes: int = 2, activators: int = 3, lease_ttl: str = "2s",
                 policy: str = ("policy: {kind: fixed, idle_after: 1h, evict_after: 2h, "
                                "check_every: 250ms}"),
                 wake_timeout: str = "30s") -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.kube = kube
        kube.write_kubeconfig(tmp / "kubeconfig")
        self.listen = free_port()
        self.envoy_admin = free_port()
        self.member_ports: dict[str, dict[str, int]] = {}
        self._common = dict(services=services, lease_ttl=lease_ttl, policy=policy,
                            wake_timeout=wake_timeout)
        self.cp_configs = [self._write(f"cp{i}") for i in range(control_planes)]
        self.act_configs = [self._write(f"a{i}") for i in range(activators)]
        self.control_planes = [self._proc(f"cp{i}", "xds-server", path)
                               for i, path in enumerate(self.cp_configs)]
        self.activators = [self._proc(f"a{i}", "activator", path, "--advertise", "127.0.0.1")
                           for i, path in enumerate(self.act_configs)]
        self.envoy: Envoy | None = None

    # --- set-up ---------------------------------------------------------------------------

    def _write(self, member: str) -> Path:
        c = self._common
        p = {k: free_port() for k in ("xds", "api", "metrics", "act", "acth2", "actm")}
        text = f"""
gateway: {{listen: 127.0.0.1:{self.listen}, admin: 127.0.0.1:{self.envoy_admin}}}
control_plane: {{xds: 127.0.0.1:{p['xds']}, admin_api: 127.0.0.1:{p['api']},
                metrics: 127.0.0.1:{p['metrics']}, ack_timeout: 5s, stats_flush_every: 1s}}
activator: {{listen: 127.0.0.1:{p['act']}, metrics: 127.0.0.1:{p['actm']},
            listen_h2: 127.0.0.1:{p['acth2']}, wake_timeout: {c['wake_timeout']},
            async_spool: ./{member}-async}}
store: {{kind: etcd, endpoints: ["{self.etcd.endpoint}"], lease_ttl: {c['lease_ttl']},
        timeout: 2s, member: {member}}}
workloads: {{kind: kubernetes, kubeconfig: ./kubeconfig, poll_every: 1s, discover: false,
            namespaces: [{NS}]}}
{c['policy']}
services:
{c['services']}
"""
        path = self.tmp / f"{member}.yaml"
        path.write_text(text)
        self.member_ports[member] = p
        return path

    def _proc(self, name: str, verb: str, config: Path, *extra: str) -> Proc:
        argv = [sys.executable, "-m", "assembly.cli", verb, "--config", str(config),
                "--log-level", "info", *extra]
        return Proc(name, argv, self.tmp / f"{name}.log")

    def ports(self, config: Path) -> dict[str, int]:
        """The ports of the member whose config file this is (xds, api, metrics: a control
        plane's; act, acth2, actm: an activator's)."""
        return self.member_ports[config.stem]

    async def start(self) -> None:
        for proc in [*self.control_planes, *self.activators]:
            proc.start()
        for i, _ in enumerate(self.control_planes):
            await self.wait_admin(i)
        for i, _ in enumerate(self.activators):
            await self.wait_activator_registered(f"a{i}")
        self.envoy = self._envoy()
        self.envoy.start()
        await self.envoy.wait_ready()

    def _envoy(self) -> Envoy:
        """Envoy on the first control plane's xDS port, with every other one added to its
        xDS cluster (a control plane that dies leaves Envoy to reconnect to another)."""
        xds_ports = [self.ports(c)["xds"] for c in self.cp_configs]
        envoy = Envoy(self.tmp, "fleet-envoy", self.envoy_admin, xds_ports[0])
        boot = json.loads(envoy._config.read_text())
        for cluster in boot["static_resources"]["clusters"]:
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            template = json.dumps(endpoints[0])
            for port in xds_ports[1:]:
                endpoints.append(json.loads(template.replace(str(xds_ports[0]), str(port))))
        envoy._config.write_text(json.dumps(boot))
        return envoy

    async def wait_admin(self, index: int, timeout: float = 60) -> None:
        proc = self.control_planes[index]

        async def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
            return "control_plane.started" in proc.text()

        await wait_until(up, timeout, f"{proc.name} started")

    async def wait_activator_registered(self, member: str, timeout: float = 60) -> None:
        proc = next(p for p in self.activators if p.name == member)

        async def registered() -> bool:
            if not proc.alive:
                raise AssertionError(f"{member} exited:\n{proc.text()[-3000:]}")
            return await self.etcd.get(f"/torpor/activators/{member}") is not None

        await wait_until(registered, timeout, f"{member} registered")

    async def stop(self) -> list[str]:
        """Stop everything; returns what did not exit cleanly (name: code)."""
        problems = []
        if self.envoy is not None:
            await stop_envoy(self.envoy)
        for proc in [*self.activators, *self.control_planes]:
            try:
                code = await proc.stop()
            finally:
                proc.kill()
            if code not in (0, None, -9):
                problems.append(f"{proc.name}: exit {code}\n{proc.text()[-2000:]}")
        return problems

    # --- looking at it ----------------------------------------------------------------------

    async def holder(self, key: str) -> str | None:
        value = await self.etcd.get(f"/torpor/{key}")
        return None if value is None else value.decode()

    async def record(self, name: str) -> dict[str, Any] | None:
        value = await self.etcd.get(f"/torpor/services/{name}")
        return None if value is None else dict(json.loads(value))

    async def wait_state(self, name: str, state: str, timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def reached() -> bool:
            found.update(await self.record(name) or {})
            return found.get("state") == state

        await wait_until(reached, timeout, f"{name} {state} (last: {found.get('state')})")
        return found

    async def envoy_endpoints(self, cluster: str) -> set[str]:
        assert self.envoy is not None
        return (await self.envoy.cluster_hosts()).get(cluster, set())

    def activator_addresses(self) -> set[str]:
        return {f"127.0.0.1:{self.ports(c)['act']}" for c in self.act_configs}

    async def metric(self, port: int, name: str, **labels: str) -> float:
        """One sample of a Prometheus metric served on 127.0.0.1:port (0 when absent)."""
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == name or head == f"{name}{{{want}}}":
                return float(value)
        return 0.0

    async def held_by_activator(self, service: str) -> dict[str, float]:
        """torpor_requests_held_total{service} of every live activator."""
        found = {}
        for proc, config in zip(self.activators, self.act_configs, strict=True):
            if proc.alive:
                found[proc.name] = await self.metric(self.ports(config)["actm"],
                                                     "torpor_requests_held_total",
                                                     service=service)
        return found


async def send(session: aiohttp.ClientSession, fleet: Fleet, host: str, path: str = "/healthz",
               body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes, float]:
    """One request through the fleet's Envoy: (status, body, seconds)."""
    started = time.monotonic()
    async with session.request("POST" if body is not None else "GET",
                               f"http://127.0.0.1:{fleet.listen}{path}", data=body,
                               headers={"Host": host},
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        return response.status, await response.read(), time.monotonic() - started
