"""A control plane and a standalone activator as separate processes on ONE config, with a
real Envoy and a second, slow "Envoy" for tests of HTTP/2 (gRPC) services.

Why: whether a held call is replayed only once EVERY Envoy applied the flip back to the
replicas can only be seen when `torpor xds-server` and `torpor activator` are apart (the
activator asks the control plane, over its admin API, whether the route is confirmed), and
when one of the Envoys can be made slow: a raw ADS client on the same control plane that
holds its ACKs (tests/support/ads_client.py). The tests that do this differ in their store
and workloads (sqlite + local replicas, tests/integration/test_standalone_activator.py;
etcd + the fake Kubernetes API, tests/fleet/test_h2_flip.py); what they share is here: the
config both processes read, the processes, the start in order, the gRPC call through the
real Envoy, and the teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import grpc

from tests.support.ads_client import AdsClient
from tests.support.envoy import Envoy, stop_envoy
from tests.support.fleet import Proc
from tests.support.grpc_echo import METHOD
from tests.support.net import free_port, wait_until
from tests.support.up import processes_mentioning
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import AdminTarget, admin_target

__all__ = ["HOST", "METHOD", "SERVICE", "TORPOR", "SplitStack", "describe", "split_config",
           "torpor_proc", "wait_logged", "wait_serving"]

#: The one service of these stacks, a gRPC echo (tests/support/grpc_echo.py).
SERVICE = "grpcsvc"
HOST = f"{SERVICE}.localhost"
#: How a torpor process is started (argv before its verb).
TORPOR = [sys.executable, "-m", "assembly.cli"]
#: The addresses a split stack reserves: Envoy's listener and admin; the control plane's
#: xDS, admin API and metrics; the activator's HTTP/1, metrics and HTTP/2 listeners.
PORT_NAMES = ("listen", "admin", "xds", "api", "metrics", "act", "actm", "acth2")


def split_config(tmp: Path, *, store: str, workloads: str, services: str,
                 control_plane_extra: str = "", activator_extra: str = "",
                 ) -> tuple[Path, dict[str, int]]:
    """One config (tmp/torpor.yaml) for both processes: they agree on every address (the
    control plane routes sleeping services to activator.listen_h2; the activator calls
    admin_api). `store` and `workloads` are YAML values, `services` the entries
    below `services:`; the extras are more `key: value` pairs of those two sections.
    Returns the path and the ports by name (PORT_NAMES)."""
    p = {k: free_port() for k in PORT_NAMES}
    cp_extra = f", {control_plane_extra}" if control_plane_extra else ""
    act_extra = f", {activator_extra}" if activator_extra else ""
    text = f"""
gateway: {{listen: 127.0.0.1:{p['listen']}, admin: 127.0.0.1:{p['admin']}}}
control_plane: {{xds: 127.0.0.1:{p['xds']}, admin_api: 127.0.0.1:{p['api']},
                metrics: 127.0.0.1:{p['metrics']}{cp_extra}}}
activator: {{listen: 127.0.0.1:{p['act']}, metrics: 127.0.0.1:{p['actm']},
            listen_h2: 127.0.0.1:{p['acth2']}{act_extra}}}
store: {store}
workloads: {workloads}
policy: {{kind: fixed, idle_after: 1h, evict_after: 2h, check_every: 1s}}
services:
{services}"""
    path = tmp / "torpor.yaml"
    path.write_text(text)
    return path, p


def torpor_proc(tmp: Path, verb: str, config: Path, *extra: str,
                command: Sequence[str] = TORPOR) -> Proc:
    """`COMMAND VERB --config CONFIG --log-level info EXTRA...`, named after its verb and
    logging to tmp/VERB.log (not started)."""
    argv = [*command, verb, "--config", str(config), "--log-level", "info", *extra]
    return Proc(verb, argv, tmp / f"{verb}.log")


async def wait_logged(proc: Proc, marker: str, timeout: float = 60) -> None:
    """Until `marker` is in the process's output; fails at once if the process exited."""
    async def logged() -> bool:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
        return marker in proc.text()

    await wait_until(logged, timeout, f"{proc.name}: {marker}", interval=0.05)


@dataclasses.dataclass
class SplitStack:
    """The processes of one test and the addresses they were given (subclasses add their
    store and workloads, e.g. etcd and the fake Kubernetes API)."""

    #: What a replica is called in messages ("replica", "pod").
    noun: ClassVar[str] = "replica"

    tmp: Path
    config: Path
    ports: dict[str, int]
    control_plane: Proc
    activator: Proc
    envoy: Envoy
    slow: AdsClient
    #: The replica's name (grpc_echo puts it in front of every answer), unique to this
    #: stack: its processes are found by it, also while another test run is going on.
    replica: str

    @property
    def admin_api(self) -> AdminTarget:
        """The admin API with the token the control plane created (the config names none)."""
        return admin_target(load_config(self.config))

    @property
    def activator_h2(self) -> str:
        return f"127.0.0.1:{self.ports['acth2']}"

    async def status(self) -> dict[str, Any]:
        """The service's status from the control plane's admin API."""
        return await asyncio.to_thread(admin_client.get_status, self.admin_api, SERVICE)

    async def call(self, payload: bytes, timeout: float = 90) -> tuple[bytes, float]:
        """One gRPC call through the real Envoy: (answer, monotonic time it completed)."""
        options = [("grpc.default_authority", HOST), ("grpc.enable_http_proxy", 0)]
        target = f"127.0.0.1:{self.ports['listen']}"
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            say = channel.unary_unary(METHOD)
            answer = await say(payload, timeout=timeout)
        return bytes(answer), time.monotonic()

    def replica_processes(self) -> list[str]:
        return processes_mentioning(f"--name {self.replica} ")

    def logs(self) -> str:
        return (f"--- control plane:\n{self.control_plane.text()[-4000:]}\n"
                f"--- activator:\n{self.activator.text()[-4000:]}\n"
                f"--- envoy:\n{self.envoy.log_text()[-2000:]}")

    async def start(self, activator_up: Callable[[], Awaitable[None]], timeout: float = 60,
                    envoy_timeout: float = 30) -> None:
        """`torpor xds-server`, the slow ADS client, `torpor activator` (up once
        `activator_up()` returns) and the real Envoy, in that order; then until the service
        is served (wait_serving). stop() stops them, whatever happened here."""
        self.control_plane.start()
        await wait_logged(self.control_plane, "control_plane.started", timeout)
        await self.slow.start()
        self.activator.start()  # its catalog mirror asks the control plane first
        await activator_up()
        self.envoy.start()
        await self.envoy.wait_ready(timeout=envoy_timeout)
        await wait_serving(self, timeout)

    async def stop(self) -> list[str]:
        """Stops the slow client, the real Envoy, the activator and the control plane
        (SIGTERM, SIGKILL as the fallback); returns a problem for each process that exited
        with an error."""
        problems = []
        await self.slow.stop()
        await stop_envoy(self.envoy)
        for proc in (self.activator, self.control_plane):
            try:
                code = await proc.stop()
            finally:
                proc.kill()
            if code not in (0, None):
                problems.append(f"{proc.name}: exit {code}\n{proc.text()[-3000:]}")
        return problems


async def wait_serving(stack: SplitStack, timeout: float = 60) -> None:
    """ACTIVE with a ready replica, in the real Envoy's cluster and in the slow client's."""
    async def serving() -> bool:
        status = await stack.status()
        if status["state"] != "ACTIVE" or not status["ready_endpoints"]:
            return False
        replica = status["ready_endpoints"][0]
        hosts = (await stack.envoy.cluster_hosts()).get(SERVICE, set())
        return hosts == {replica} and stack.slow.last_endpoints(SERVICE) == {replica}

    await wait_until(serving, timeout, f"{SERVICE} served by its {stack.noun}",
                     interval=0.1)


def describe(task: asyncio.Task[tuple[bytes, float]]) -> str:
    """What became of a call's task, for a failure message."""
    if not task.done():
        return "pending"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"failed: {exc!r}" if exc is not None else f"answered {task.result()[0]!r}"
