"""`torpor up`: the whole gateway on one machine, in the foreground.

Owns the start and stop order: ports checked before anything starts; then the control
plane (which loads state, starts replicas and only then serves xDS), the activator, and an
Envoy bootstrapped to the control plane. On SIGINT/SIGTERM, or if Envoy dies, everything
started here is stopped: Envoy first (no more traffic), then the activator, then the
control plane and every replica it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

from activator.server import ActivatorServer
from torpor.advertise import advertised_activator_host
from torpor.config import Config
from torpor.coordination import open_coordination
from torpor.errors import TorporError
from torpor.gateway import EnvoyProcess
from torpor.model import Endpoint
from torpor.workloads import make_workloads
from xds_server.bootstrap import bootstrap
from xds_server.control_plane import ControlPlane

#: How long `up` shows start-up progress before it stops waiting for slow services.
PROGRESS_TIMEOUT = 300.0


def check_ports_free(config: Config) -> None:
    """Fail before starting anything if an address torpor must bind is taken."""
    for key, address in config.listeners().items():
        if address.port == 0 or key == "activator.metrics":
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise TorporError(
                    f"{config.path}: {key}: cannot listen on {address} ({exc.strerror}); "
                    "is another torpor or Envoy running?"
                ) from exc


async def run_up(config: Config, out: TextIO = sys.stdout) -> int:
    """Run until a signal arrives; returns the exit code."""
    check_ports_free(config)
    logs = config.log_dir()
    logs.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_on, stop, sig, out)

    fleet = open_coordination(config)
    await fleet.open()
    control_plane = ControlPlane(config, fleet.store, make_workloads(config),
                                 locks=fleet.locks, election=fleet.election,
                                 registry=fleet.registry)
    # One process, one waker: the activator and `torpor wake` share the control plane's.
    activator = ActivatorServer(config, control_plane.waker, catalog=control_plane.catalog,
                                on_held=control_plane.collector.note_held,
                                after_wake=control_plane.wait_routed)
    envoy: EnvoyProcess | None = None
    try:
        ports = await control_plane.start()
        say(out, f"control plane: xDS on {config.control_plane.xds.host}:{ports.xds}, "
                 f"admin API on {config.control_plane.admin_api}, "
                 f"metrics on http://{config.control_plane.metrics}/metrics")
        await activator.start()
        if fleet.registry is not None:  # store: etcd — other control planes list it too
            host = advertised_activator_host(config.activator)
            await fleet.registry.register(Endpoint(host, activator.port),
                                          Endpoint(host, activator.port_h2))
        envoy = await start_envoy(config, ports.xds, logs)
        say(out, f"envoy: listening on http://{config.gateway.listen}, "
                 f"admin on http://{config.gateway.admin} (log: {logs / 'envoy.log'})")
        envoy_exit = asyncio.create_task(envoy.wait_exit())
        progress = asyncio.create_task(show_progress(control_plane, config, out))
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({envoy_exit, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        progress.cancel()
        if envoy_exit.done():
            say(out, f"envoy exited with code {envoy_exit.result()}; stopping "
                     f"(see {logs / 'envoy.log'})")
            return 1
        stop_wait.cancel()
        envoy_exit.cancel()
        say(out, "stopping...")
        return 0
    finally:
        if envoy is not None:
            await envoy.stop()
        await activator.stop()
        with contextlib.suppress(Exception):
            await control_plane.stop()
        with contextlib.suppress(Exception):
            await fleet.close()
        say(out, "stopped; no process left running")


async def start_envoy(config: Config, xds_port: int, logs: Path) -> EnvoyProcess:
    xds = config.control_plane.xds
    boot = bootstrap(config.control_plane.node_id, config.gateway.admin,
                     type(xds)(xds.host, xds_port))
    path = logs / "envoy-bootstrap.json"
    path.write_text(json.dumps(boot, indent=2))
    envoy = EnvoyProcess(path, logs / "envoy.log", config.gateway.admin)
    await envoy.start()
    try:
        await envoy.wait_ready(timeout=60)
    except BaseException:
        await envoy.stop()
        raise
    return envoy


async def show_progress(control_plane: ControlPlane, config: Config, out: TextIO) -> None:
    """Print each service's ready count as it changes, then where to send requests."""
    shown: dict[str, str] = {}
    deadline = asyncio.get_running_loop().time() + PROGRESS_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        statuses = await control_plane.statuses()
        pending = False
        for status in statuses:
            line = (f"{status.name}: {status.state.value}, "
                    f"{len(status.ready_endpoints)}/{status.desired_replicas} ready")
            if status.state.value == "ACTIVE" and len(status.ready_endpoints) < \
                    status.desired_replicas:
                pending = True
            if shown.get(status.name) != line:
                shown[status.name] = line
                say(out, "  " + line)
        if not pending:
            break
        await asyncio.sleep(0.25)
    say(out, "ready. Send requests through the gateway, e.g.:")
    for service in config.services:
        say(out, f"  curl -H 'Host: {service.host}' http://{config.gateway.listen}/predict "
                 "-d 'what a great day'")
    say(out, "Ctrl-C stops torpor and every process it started.")


def _stop_on(stop: asyncio.Event, sig: signal.Signals, out: TextIO) -> None:
    say(out, f"received {sig.name}")
    stop.set()


def say(out: TextIO, text: str) -> None:
    print(f"torpor: {text}", file=out, flush=True)
